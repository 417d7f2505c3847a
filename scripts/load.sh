#!/usr/bin/env bash
# The load suite: set the machine up, then run benchmarks/load against the
# installed pht (loopback only; see docs/load.md). Arguments go to it,
# e.g. --quick, --size medium, --scenario idle, --json results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m benchmarks.load "$@"
