"""One real ``specapprox-serve`` shared by the load-test and metrics test modules.

A server start costs about 40 s here, so both modules use this session-scoped fixture. A
fixture imported into two modules becomes two fixture definitions, so the process itself is
cached at module level and stopped when the last user's teardown runs (end of session).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require_model
from tests.server_utils import ServerProcess

_STATE: dict[str, object] = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def live_server() -> Iterator[ServerProcess]:
    require_model()
    if _STATE["server"] is None:
        _STATE["server"] = ServerProcess().start()
    _STATE["users"] = int(_STATE["users"]) + 1  # type: ignore[call-overload]
    srv = _STATE["server"]
    assert isinstance(srv, ServerProcess)
    try:
        yield srv
    finally:
        _STATE["users"] = int(_STATE["users"]) - 1  # type: ignore[call-overload]
        if _STATE["users"] == 0:
            srv.stop()
            _STATE["server"] = None
