"""Reporting a load test: the printed block (the layout of ``vllm bench serve``, plus the
approximation and failure sections), the per-request JSONL, the summary JSON and the charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specapprox_vllm.tools.loadtest.stats import RequestRecord

WIDTH = 50
METRICS = (("ttft_ms", "TTFT", "Time to First Token"),
           ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl_ms", "ITL", "Inter-token Latency"),
           ("e2el_ms", "E2EL", "End-to-end Latency"))


def _row(label: str, value: Any, fmt: str = "") -> str:
    if value is None:
        text = "n/a"
    elif fmt:
        text = format(value, fmt)
    else:
        text = str(value)
    return f"{label:<40} {text:<10}"


def _header(title: str, char: str = "-") -> str:
    return "{s:{c}^{n}}".format(s=title, n=WIDTH, c=char)


def _counts(d: dict[str, int]) -> str:
    # "(none)": nothing counted (a bare "none" would read as the method of that name)
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "(none)"


def format_block(label: str, s: dict[str, Any], max_concurrency: int | None,
                 request_rate: float) -> str:
    """The result block of one setting."""
    lines = [_header(" Serving Benchmark Result ", "="),
             _row("Setting:", label),
             _row("Successful requests:", s["completed"]),
             _row("Failed requests:", s["failed"])]
    if max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", max_concurrency))
    if request_rate != float("inf"):
        lines.append(_row("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [_row("Benchmark duration (s):", s["duration_s"], ".2f"),
              _row("Total input tokens:", s["total_input_tokens"]),
              _row("Total generated tokens:", s["total_output_tokens"]),
              _row("Request throughput (req/s):", s["request_throughput"], ".2f")]
    if "goodput" in s:
        lines.append(_row("Request goodput (req/s):", s["goodput"]["request_goodput"], ".2f"))
    lines += [_row("Output token throughput (tok/s):", s["output_throughput"], ".2f"),
              _row("Total token throughput (tok/s):", s["total_token_throughput"], ".2f")]
    if s.get("usage_missing"):
        lines.append(_row("Responses without usage:", s["usage_missing"]))
    for key, short, title in METRICS:
        d = s[key]
        lines.append(_header(title))
        lines.append(_row(f"Mean {short} (ms):", d["mean"], ".2f"))
        lines.append(_row(f"Median {short} (ms):", d["median"], ".2f"))
        lines.append(_row(f"P90 {short} (ms):", d["p90"], ".2f"))
        lines.append(_row(f"P99 {short} (ms):", d["p99"], ".2f"))
    a = s["approx"]
    lines.append(_header("Approximation (usage.approx)"))
    lines.append(_row("Responses with usage.approx:", a["reported"]))
    if a["reported"]:
        lines += [_row("Methods reported:", _counts(a["methods"])),
                  _row("Approximation applied:", a["applied"]),
                  _row("Prompt tokens in (sum):", int(a["prompt_tokens_in"]["sum"])),
                  _row("Prompt tokens kept (sum):", int(a["prompt_tokens_kept"]["sum"])),
                  _row("Prompt kept ratio:", a["prompt_kept_ratio"], ".3f"),
                  _row("Mean KV entries kept:", a["kv_entries_kept"]["mean"], ".1f"),
                  _row("Mean draft tokens:", a["draft_tokens"]["mean"], ".1f"),
                  _row("Mean draft time (ms):", a["draft_ms"]["mean"], ".2f"),
                  _row("P99 draft time (ms):", a["draft_ms"]["p99"], ".2f"),
                  _row("Mean selection time (ms):", a["select_ms"]["mean"], ".2f"),
                  _row("P99 selection time (ms):", a["select_ms"]["p99"], ".2f")]
        if a["reasons"]:
            lines.append(_row("Not applied because:", _counts(a["reasons"])))
    f = s["failures"]
    if s["failed"]:
        lines += [_header("Failures"),
                  _row("By HTTP status:", _counts(f["by_status"])),
                  _row("By error type:", _counts(f["by_type"]))]
        first = f["examples"][0]["error"] if f["examples"] else ""
        lines.append("First error: " + first[:200])
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """One line per setting, for ``--compare``."""
    head = f"{'setting':<28}{'ok':>5}{'fail':>5}{'req/s':>8}{'tok/s':>9}{'TTFT':>9}" \
           f"{'TPOT':>8}{'E2E p99':>10}{'kept':>7}"
    lines = [_header(" Comparison ", "="), head, "(times: mean ms; kept: prompt tokens kept/in)"]

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for label, s in summaries.items():
        lines.append(f"{label[:27]:<28}{s['completed']:>5}{s['failed']:>5}"
                     f"{s['request_throughput']:>8.2f}{s['output_throughput']:>9.1f}"
                     f"{num(s['ttft_ms']['mean'], '.0f'):>9}{num(s['tpot_ms']['mean'], '.1f'):>8}"
                     f"{num(s['e2el_ms']['p99'], '.0f'):>10}"
                     f"{num(s['approx']['prompt_kept_ratio'], '.3f'):>7}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def write_results(out_dir: Path, records: list[RequestRecord], summary: dict[str, Any],
                  keep_text: bool) -> tuple[Path, Path]:
    """``requests.jsonl`` (one line per request, all settings) and ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "requests.jsonl"
    with jsonl.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(keep_text)) + "\n")
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return jsonl, summary_path


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step([xs[0], *xs], [0.0, *ys], where="post", label=label)


def write_plots(out_dir: Path, records: list[RequestRecord],
                summaries: dict[str, dict[str, Any]]) -> list[Path]:
    """``latency_cdf.png`` (TTFT, TPOT, ITL, E2E CDFs, one line per setting) and
    ``throughput.png`` (request and output-token throughput per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_setting: dict[str, list[RequestRecord]] = {k: [] for k in summaries}
    for rec in records:
        by_setting.setdefault(rec.setting, []).append(rec)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    getters = {"TTFT": lambda r: [r.ttft] if r.ttft is not None else [],
               "TPOT": lambda r: [r.tpot] if r.tpot is not None else [],
               "ITL": lambda r: r.itl,
               "E2E": lambda r: [r.e2e] if r.e2e is not None else []}
    for ax, (name, get) in zip(axes.flat, getters.items(), strict=True):
        for label, recs in by_setting.items():
            vals = [v * 1000.0 for r in recs if r.success for v in get(r)]
            if vals:
                _cdf(ax, vals, label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    cdf_path = out_dir / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    labels = list(summaries)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(labels, [summaries[k]["request_throughput"] for k in labels], color="tab:blue")
    ax1.set_title("Request throughput (req/s)")
    ax2.bar(labels, [summaries[k]["output_throughput"] for k in labels], color="tab:green")
    ax2.set_title("Output token throughput (tok/s)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
        for i, k in enumerate(labels):
            if summaries[k]["failed"]:
                ax.annotate(f"{summaries[k]['failed']} failed", (i, 0), ha="center",
                            va="bottom", color="tab:red", fontsize=8)
    fig.tight_layout()
    tp_path = out_dir / "throughput.png"
    fig.savefig(tp_path, dpi=100)
    plt.close(fig)
    return [cdf_path, tp_path]
