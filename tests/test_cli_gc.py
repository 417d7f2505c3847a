"""The command line tunes the garbage collector once its services listen.

With thousands of tunnels open, a full collection stops every one of them
(docs/load.md): ``pht`` freezes what start-up made and makes full
collections rarer, and puts Python's settings back when it returns.
"""

from __future__ import annotations

import gc

from pht.cli._run import FULL_COLLECTION_THRESHOLD, _Collector

from .test_cli_run import PhtProcess


def test_tune_freezes_start_up_and_restore_undoes_it() -> None:
    before = gc.get_threshold()
    collector = _Collector()
    collector.tune()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (*before[:2], max(before[2], FULL_COLLECTION_THRESHOLD))
        collector.tune()  # once only: a second call changes nothing
        assert collector.saved == before
    finally:
        collector.restore()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    collector.restore()  # harmless when not tuned
    assert gc.get_threshold() == before


def test_a_running_pht_has_its_collector_tuned() -> None:
    with PhtProcess("-D", "-L", "tcp://127.0.0.1:0/127.0.0.1:9") as server:
        line = server.wait_for(r"gc: (\d+) start-up objects frozen; a full collection after (\d+)")
    assert int(line.group(1)) > 1000  # the modules and the configuration, at least
    assert int(line.group(2)) == FULL_COLLECTION_THRESHOLD
