"""The package's shape, checked on its source (issue 17): one list of methods, one vLLM
boundary, folders that say which process runs the code, files that stay readable.

* No string literal naming a method outside ``specapprox_vllm/policies/`` (in
  ``specapprox_vllm/`` and ``server/``): the registry is the only list of methods, and code
  asks a policy's facts instead of comparing names.
* The API-process code (``server/``, ``specapprox_vllm/frontend/``) never imports
  ``specapprox_vllm.worker``; the engine side never imports the API side.
* vLLM is imported outside ``vllm_compat.py`` only through its public API.
* No source file over 500 lines; no ``sys.path`` manipulation anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from specapprox_vllm.policies import method_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "specapprox_vllm"
PRODUCT = [*PACKAGE.rglob("*.py"), *(ROOT / "server").rglob("*.py")]
# What the product may import from vLLM outside vllm_compat.py: its public API.
PUBLIC_VLLM = {
    "vllm",  # SamplingParams, __version__
    "vllm.v1.engine.async_llm",  # AsyncLLM
    "vllm.engine.arg_utils",  # AsyncEngineArgs
    "vllm.exceptions",
    "vllm.distributed.kv_transfer.kv_connector.v1.base",  # the connector interface we implement
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append(f"{base}.{node.module}" if node.module else base)
            else:
                out.append(node.module or "")
    return out


def _method_literals(path: Path, methods: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = {p.strip() for p in node.value.split(",")}
            if node.value in methods or (len(parts) > 1 and parts <= methods):
                found.append(f"{_rel(path)}:{node.lineno}: {node.value!r}")
    return found


def test_no_method_is_named_by_string_outside_the_policies() -> None:
    methods = set(method_names())
    policies = PACKAGE / "policies"
    found = [hit for p in PRODUCT if policies not in p.parents
             for hit in _method_literals(p, methods)]
    assert not found, "\n".join(found)


def test_the_checker_sees_method_literals(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text('A = "speckv"\nB = "none,specpc"\nC = "a speckv sentence"\n')
    assert len(_method_literals(src, set(method_names()))) == 2


@pytest.mark.parametrize("side", ["server", "specapprox_vllm/frontend"])
def test_api_process_code_never_imports_worker_code(side: str) -> None:
    bad = [f"{_rel(p)} imports {m}" for p in (ROOT / side).rglob("*.py")
           for m in _imports(p) if m.startswith("specapprox_vllm.worker")]
    assert not bad, "\n".join(bad)


def test_worker_code_never_imports_api_process_code() -> None:
    bad = [f"{_rel(p)} imports {m}" for p in (PACKAGE / "worker").rglob("*.py")
           for m in _imports(p)
           if m.startswith(("server", "specapprox_vllm.frontend", "specapprox_vllm.tools"))]
    assert not bad, "\n".join(bad)


def test_policies_are_pure_maths() -> None:
    bad = [f"{_rel(p)} imports {m}" for p in (PACKAGE / "policies").rglob("*.py")
           for m in _imports(p) if m.split(".")[0] in ("vllm", "transformers", "server")
           or m.startswith(("specapprox_vllm.frontend", "specapprox_vllm.worker"))]
    assert not bad, "\n".join(bad)


def test_vllm_internals_only_through_the_compat_module() -> None:
    compat = PACKAGE / "vllm_compat.py"
    tools = PACKAGE / "tools"
    bad = [f"{_rel(p)} imports {m}" for p in PRODUCT if p != compat and tools not in p.parents
           for m in _imports(p) if m.split(".")[0] == "vllm" and m not in PUBLIC_VLLM]
    assert not bad, "\n".join(bad)


def test_files_stay_under_500_lines() -> None:
    sources = [*PRODUCT, *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    long = [f"{_rel(p)}: {n}" for p in sources if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "\n".join(long)


def test_no_sys_path_tricks() -> None:
    sources = [*PRODUCT, *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    bad = [_rel(p) for p in sources if "sys.path" in p.read_text() and p != Path(__file__)]
    assert not bad, bad
