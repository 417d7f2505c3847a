"""The gost-style command line: ``pht -L ... -F ... -C file.yaml``.

Run as ``pht`` (console script) or ``python -m pht``. See docs/cli.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._spec import ConfigError

__all__ = ["ConfigError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    # Imported here so that parsing modules stay importable without the
    # adapters (and so that `import pht.cli` is cheap).
    from ._run import run

    return run(argv)
