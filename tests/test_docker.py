"""The Docker deployment files, checked without a Docker engine (none runs on our machines).

Compose: ``docker compose config`` is not available here (the docker client has no compose
plugin), so the files are validated with PyYAML + jsonschema against rules encoded below: a
subset of the Compose Specification (allowed top-level and service keys, healthcheck,
depends_on conditions, deploy resources, profiles), after the same ``${VAR:-default}``
interpolation compose does. On top of the schema: every command parses with the real CLI
parser and uses only flags that ``--help`` lists, every host path exists in the repository
(or is a git-ignored output folder), and the Dockerfiles install only through
``scripts/setup.sh``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from server.cli import build_parser as serve_parser
from specapprox_vllm.tools.loadtest.cli import build_parser as loadtest_parser
from tests.conftest import ROOT

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

_STR_LIST = {"type": "array", "items": {"type": "string"}}
_CMD = {"oneOf": [{"type": "string"}, _STR_LIST]}
_DURATION = {"type": "string", "pattern": r"^(\d+(us|ms|s|m|h))+$"}
_RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    "cpus": {"type": ["string", "number"], "pattern": r"^\d+(\.\d+)?$"},
    "memory": {"type": "string", "pattern": r"^\d+[bkmg]?$"},
    "devices": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["capabilities"],
        "properties": {"driver": {"type": "string"}, "count": {"type": ["string", "integer"]},
                       "capabilities": _STR_LIST, "device_ids": _STR_LIST}}}}}
SERVICE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "build": {"type": "object", "additionalProperties": False, "required": ["context"],
                  "properties": {"context": {"type": "string"},
                                 "dockerfile": {"type": "string"},
                                 "args": {"type": "object"}}},
        "image": {"type": "string"}, "command": _CMD, "entrypoint": _CMD,
        "environment": {"type": "object", "additionalProperties": {
            "type": ["string", "number", "boolean", "null"]}},
        "ports": {"type": "array", "items": {
            "type": "string", "pattern": r"^(\d+\.\d+\.\d+\.\d+:)?\d+:\d+(/(tcp|udp))?$"}},
        "volumes": {"type": "array", "items": {
            "type": "string", "pattern": r"^[^:]+:/[^:]*(:(ro|rw))?$"}},
        "healthcheck": {"type": "object", "additionalProperties": False, "required": ["test"],
                        "properties": {"test": _CMD, "interval": _DURATION,
                                       "timeout": _DURATION, "start_period": _DURATION,
                                       "retries": {"type": "integer", "minimum": 1},
                                       "disable": {"type": "boolean"}}},
        "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
        "stop_grace_period": _DURATION,
        "shm_size": {"type": "string", "pattern": r"^\d+[bkmg]b?$"},
        "cap_add": _STR_LIST, "ipc": {"type": "string"}, "user": {"type": "string"},
        "profiles": {**_STR_LIST, "minItems": 1},
        "depends_on": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": False, "required": ["condition"],
            "properties": {"condition": {"enum": ["service_started", "service_healthy",
                                                  "service_completed_successfully"]}}}},
        "deploy": {"type": "object", "additionalProperties": False, "properties": {
            "resources": {"type": "object", "additionalProperties": False, "properties": {
                "limits": _RESOURCES, "reservations": _RESOURCES}}}},
    },
}
COMPOSE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["services"],
    "patternProperties": {"^x-": {}},
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
                   "services": {"type": "object", "minProperties": 1,
                                "additionalProperties": SERVICE},
                   "volumes": {"type": "object", "additionalProperties": {
                       "type": ["object", "null"]}}},
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``${V}``, ``${V:-default}``, ``${V:?error}``)."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.endswith("?") and not value:
            raise ValueError(f"required variable {name}: {arg}")
        if op and (value is None or (op.startswith(":") and value == "")):
            return arg
        return value or ""

    return _VAR.sub(sub, obj)


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def merge(base: Any, over: Any) -> Any:
    """Compose's override merge, enough for our files: dicts deep, lists appended."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in over.items()}}
    if isinstance(base, list) and isinstance(over, list):
        return base + over
    return over


def help_flags(script: str) -> set[str]:
    """The flags ``<script> --help`` prints (the installed console script)."""
    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"console script {script} missing (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][\w.-]*", out))


def used_flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined, comments dropped."""
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        if not cur and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        lines.append(cur + raw)
        cur = ""
    out = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def instructions(path: Path, word: str) -> list[str]:
    return [rest for w, rest in parse_dockerfile(path) if w == word]


def git_ignored(rel: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]],
                         ids=["cpu", "cpu+gpu-override"])
def test_compose_is_schema_valid(files: list[Path]) -> None:
    merged: dict[str, Any] = {}
    for f in files:
        doc = load_compose(f)
        jsonschema.validate(doc, COMPOSE_SCHEMA)
        merged = merge(merged, doc)
    jsonschema.validate(merged, COMPOSE_SCHEMA)
    services = merged["services"]
    assert set(services) == {"server", "loadtest", "prometheus", "grafana"}
    for svc in services.values():
        assert "image" in svc or "build" in svc
        for dep in svc.get("depends_on", {}):
            assert dep in services
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in merged["volumes"], f"named volume {src} not declared"


def test_compose_rejects_what_the_rules_forbid() -> None:
    """The encoded rules can fail: typos and wrong shapes are caught."""
    good = load_compose(COMPOSE)
    for mutate in (lambda d: d["services"]["server"].update(helthcheck={}),
                   lambda d: d["services"]["loadtest"]["depends_on"]["server"].update(
                       condition="healthy"),
                   lambda d: d["services"]["server"].update(restart="sometimes"),
                   lambda d: d["services"]["server"]["deploy"]["resources"]["limits"].update(
                       memory="lots")):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, COMPOSE_SCHEMA)


def test_compose_server_loadtest_and_prometheus_rules() -> None:
    s = load_compose(COMPOSE)["services"]
    server, lt, prom = s["server"], s["loadtest"], s["prometheus"]
    port = serve_parser().parse_args(server["command"][1:]).short__port
    health = " ".join(server["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health" in health
    assert server["restart"] == "unless-stopped"
    assert set(server["deploy"]["resources"]["limits"]) == {"cpus", "memory"}
    assert {v.split(":")[1] for v in server["volumes"]} >= {"/opt/specapprox/configs",
                                                            "/opt/specapprox/models"}
    assert all(p.startswith("127.0.0.1:") for svc in s.values() for p in svc.get("ports", []))
    assert lt["profiles"] == ["loadtest"] and prom["profiles"] == ["monitoring"]
    for svc in (lt, prom):
        assert svc["depends_on"] == {"server": {"condition": "service_healthy"}}
    args = loadtest_parser().parse_args(lt["command"][1:])
    url = urlsplit(args.base_url)
    assert (url.hostname, url.port) == ("server", int(port)) and args.allow_remote
    assert any(str(args.result_dir).startswith(v.split(":")[1]) for v in lt["volumes"])
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == [f"server:{port}"]


def test_grafana_is_provisioned_with_the_dashboard_and_its_data_source() -> None:
    """The monitoring profile's Grafana loads docker/grafana/dashboards/*.json through the
    provider's path, and every panel names the provisioned data source (which points at the
    compose Prometheus). The queries themselves are checked against a live server in
    tests/test_metrics.py."""
    s = load_compose(COMPOSE)["services"]
    graf, prom = s["grafana"], s["prometheus"]
    assert graf["profiles"] == ["monitoring"]
    assert graf["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve()
              for v in graf["volumes"] if v.startswith(".")}
    prov = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    prom_port = prom["ports"][0].rsplit(":", 1)[1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prom_port}"
    (provider,) = yaml.safe_load((prov / "dashboards" / "specapprox.yml").read_text())[
        "providers"]
    folder = mounts[provider["options"]["path"]]
    dashboards = sorted(folder.glob("*.json"))
    assert [d.name for d in dashboards] == ["specapprox.json"]
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (folder / Path(home).relative_to(provider["options"]["path"])).is_file()
    dash = json.loads(dashboards[0].read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = {p["datasource"]["uid"] for p in dash["panels"]}
    used |= {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    used |= {v["datasource"]["uid"] for v in dash["templating"]["list"]}
    assert used == {source["uid"]}
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("requests", "latency", "first token", "kept fraction", "kv-cache blocks",
                  "draft time", "selection time", "queue depth", "errors by status"):
        assert topic in titles, topic


def test_commands_match_the_clis() -> None:
    """Every command in compose and the Dockerfiles is one of our console scripts, parses
    with its real parser, and uses only flags its ``--help`` lists."""
    commands = [svc["command"] for f in (COMPOSE, COMPOSE_GPU)
                for svc in load_compose(f)["services"].values() if "command" in svc]
    for dockerfile in (DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"):
        commands += [json.loads(c) for c in instructions(dockerfile, "CMD")]
    ours = [c for c in commands if c[0] in SCRIPTS]
    assert len(ours) == 4  # compose server + loadtest, and both images' CMD
    parsers = {"specapprox-serve": serve_parser, "specapprox-loadtest": loadtest_parser}
    helps = {name: help_flags(name) for name in parsers}
    for cmd in ours:
        parsers[cmd[0]]().parse_args(cmd[1:])  # exits (fails the test) on a bad flag
        assert used_flags(cmd[1:]) <= helps[cmd[0]], cmd
        if cmd[0] == "specapprox-serve":
            assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    others = [c for c in commands if c[0] not in SCRIPTS]
    assert [c[0].split("=")[0] for c in others] == ["--config.file"]  # prometheus' own


def test_compose_paths_exist_in_the_repo() -> None:
    for f in (COMPOSE, COMPOSE_GPU):
        for name, svc in load_compose(f)["services"].items():
            build = svc.get("build")
            if build:
                context = (f.parent / build["context"]).resolve()
                assert (context / build["dockerfile"]).is_file(), (name, build)
            for vol in svc.get("volumes", []):
                src, dst = vol.split(":")[:2]
                if not src.startswith((".", "/")):
                    continue  # named volume
                path = (f.parent / src).resolve()
                rel = path.relative_to(ROOT).as_posix()
                assert path.exists() or git_ignored(rel + "/"), f"{f.name}: {vol}"
    server = load_compose(COMPOSE)["services"]["server"]
    config = serve_parser().parse_args(server["command"][1:]).config
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    for target, src in mounts.items():
        if config.startswith(target + "/") and src.startswith("."):
            assert (DOCKER / src / config[len(target) + 1:]).resolve().is_file(), config
            break
    else:
        pytest.fail(f"{config} is not on a mounted host folder")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_install_only_through_the_setup_script(name: str) -> None:
    path = DOCKER / name
    runs = instructions(path, "RUN")
    assert not [r for r in runs if re.search(r"\b(pip3?|uv)\b[^&;|]*\binstall\b", r)], runs
    assert sum("bash scripts/setup.sh" in r for r in runs) == 1
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "SPECAPPROX_EXTRAS" in setup and "SPECAPPROX_VENV" in setup
    env = " ".join(instructions(path, "ENV"))
    extras = re.search(r"SPECAPPROX_EXTRAS=(\S+)", env).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert ("gpu" in extras) == (name == "Dockerfile.gpu")
    sources = [w for c in instructions(path, "COPY") for w in shlex.split(c)[:-1]
               if not w.startswith("--")]
    assert set(sources) >= {"pyproject.toml", "README.md", "scripts/", "specapprox_vllm/",
                            "server/", "configs/"}
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not git_ignored(src)
    user = instructions(path, "USER")
    assert user and user[-1] not in ("root", "0")
    assert "/health" in instructions(path, "HEALTHCHECK")[0]
    if name == "Dockerfile.gpu":
        vllm_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"]
                        if d.startswith("vllm==")).split("==")[1]
        arg = next(a for a in instructions(path, "ARG") if a.startswith("VLLM_IMAGE="))
        assert arg == f"VLLM_IMAGE=vllm/vllm-openai:v{vllm_pin}"
        assert instructions(path, "ENTRYPOINT") == ["[]"]
        assert "/models" in instructions(path, "VOLUME")[0]
    else:
        assert instructions(path, "FROM")[0].startswith("python:3.11-slim")


def test_dockerignore_keeps_the_context_to_sources() -> None:
    rules = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "models", "results"} <= rules
    assert not rules & {"scripts", "server", "specapprox_vllm", "configs", "README.md"}


def test_readme_compose_commands_refer_to_real_files_and_profiles() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy with docker compose", 1)[1].split("\n## ", 1)[0]
    profiles = {p for svc in load_compose(COMPOSE)["services"].values()
                for p in svc.get("profiles", [])}
    services = set(load_compose(COMPOSE)["services"])
    cmds = [line.strip() for line in section.splitlines() if "docker compose" in line]
    assert len(cmds) >= 4
    for cmd in cmds:
        words = shlex.split(cmd.split("#")[0])
        for i, w in enumerate(words):
            if w == "-f":
                assert (ROOT / words[i + 1]).is_file(), cmd
            if w == "--profile":
                assert words[i + 1] in profiles, cmd
            if w in ("up", "run", "logs") and i + 1 < len(words):
                named = [x for x in words[i + 1:] if not x.startswith("-")]
                assert set(named) <= services, cmd
