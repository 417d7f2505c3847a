#!/usr/bin/env bash
# The benchmarks: set the machine up, then run the library benchmark
# (benchmarks/run.py), the end-to-end command-line benchmark (benchmarks/e2e.py)
# and the adapters side by side (benchmarks/adapters.py: trio, asyncio, uvloop).
#   scripts/bench.sh [--quick]       all three (--quick: small sizes, the smoke-test mode)
#   scripts/bench.sh library ARGS    only run.py with ARGS (e.g. --only bulk, --runs 5)
#   scripts/bench.sh e2e ARGS        only e2e.py with ARGS (e.g. --runs 7, --profile,
#                                    --loops all: per event loop, trio / asyncio / uvloop)
#   scripts/bench.sh adapters ARGS   only adapters.py with ARGS (e.g. --runs 7)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The plots need matplotlib; profiles use pyinstrument / py-spy (see docs/performance.md).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/requirements.txt
case "${1:-}" in
    library) shift; exec .venv/bin/python benchmarks/run.py "$@" ;;
    e2e) shift; exec .venv/bin/python benchmarks/e2e.py "$@" ;;
    adapters) shift; exec .venv/bin/python benchmarks/adapters.py "$@" ;;
esac
.venv/bin/python benchmarks/run.py "$@"
quick=()
for argument in "$@"; do
    if [[ $argument == --quick ]]; then quick=(--quick); fi
done
# End to end on every event loop the command line can run on (pht-trio, pht-uvloop...).
.venv/bin/python benchmarks/e2e.py "${quick[@]}" --loops all
exec .venv/bin/python benchmarks/adapters.py "${quick[@]}"
