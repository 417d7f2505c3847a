"""GOST's captured requests replayed against PHTApp under the real uvicorn and hypercorn.

The replay is ``test_conformance_server.py``'s, run here against
``tests.asgi_site:conformance`` (PHTApp served alone, heartbeats every
0.2 s, GOST's echo and bye callback) instead of ``serve_pht``: the same
statuses, headers and pull lines, including where pht deliberately answers
better than GOST.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_asgi_servers import SERVERS, start_site
from .test_conformance_server import (
    test_replay_legacy_capture_statuses,
    test_replay_modern_capture,
)

pytestmark = pytest.mark.slow

__all__ = ["test_replay_legacy_capture_statuses", "test_replay_modern_capture"]


@pytest.fixture(params=SERVERS)
def server_port(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    site = start_site(request.param, tmp_path, app="tests.asgi_site:conformance")
    yield site.port
    site.stop()
