#!/usr/bin/env bash
# The benchmarks: set the machine up, then run benchmarks/run.py.
# Arguments go to run.py (e.g. --quick, --only bulk, --runs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The plot needs matplotlib; profiles use pyinstrument / py-spy (see docs/performance.md).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
exec .venv/bin/python benchmarks/run.py "$@"
