"""Coverage-guided fuzzing of the sans-IO server (atheris / libFuzzer).

Each input is one connection's bytes: the first byte picks how the stream is
cut into reads, the rest is what the client sent. The connection is driven as
``serve_pht`` drives it (see :func:`tests.fuzz.drivers.drive_server`): only
pht's protocol errors may escape, every refusal is a ``4xx``, and held input
stays bounded. Run with ``scripts/fuzz.sh`` or directly::

    .venv/bin/python tests/fuzz/fuzz_server.py -max_total_time=60 -dict=tests/fuzz/http.dict
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["pht", "h11"]):
    from tests.fuzz.drivers import drive_server, split


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sizes = [data[0] % 64 + 1, data[0] // 4 + 1]
    drive_server(split(data[1:], sizes))


def main() -> None:
    atheris.instrument_func(test_one_input)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
