"""``python -m pht``: the gost-style command line (see :mod:`pht.cli`)."""

from __future__ import annotations

from pht.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
