"""Coverage-guided fuzzing of the sans-IO client channel (atheris / libFuzzer).

Each input is a server's answer to one request: the first byte picks the
request (authorize, push, pull, close), the generation (authorize or not) and
how the answer is cut into reads; the rest is what the server sent. The
channel is driven as ``open_pht_stream`` drives it (see
:func:`tests.fuzz.drivers.drive_client`): only pht's protocol errors may
escape, no event carries more than was fed, and held input stays bounded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["pht", "h11"]):
    from tests.fuzz.drivers import KINDS, drive_client, split


def test_one_input(data: bytes) -> None:
    if not data:
        return
    head = data[0]
    kind = KINDS[head % len(KINDS)]
    authorize = bool(head & 4)
    sizes = [(head >> 3) * 9 + 1, 3]
    drive_client(kind, authorize, split(data[1:], sizes))


def main() -> None:
    atheris.instrument_func(test_one_input)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
