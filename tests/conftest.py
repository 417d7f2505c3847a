"""Fixtures shared by the test modules.

Helpers that are plain functions (``echo``, ``receive_exactly``,
``start_server``) live in :mod:`tests.support`; fixtures live here.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """A clock that jumps ahead whenever every task waits: timeouts without real sleeps."""
    return trio.testing.MockClock(autojump_threshold=0)
