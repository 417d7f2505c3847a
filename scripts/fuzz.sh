#!/usr/bin/env bash
# Fuzz pht's sans-IO server and client with atheris (coverage-guided, libFuzzer).
#
#   scripts/fuzz.sh [SECONDS] [server|client|both]    default: 60 s each, both
#
# New interesting inputs go to .fuzz/corpus-<target>/ (kept between runs),
# crashes to .fuzz/crash-*; replay one with
#   .venv/bin/python tests/fuzz/fuzz_server.py .fuzz/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
which=${2:-both}
python=.venv/bin/python
[ -x "$python" ] || scripts/setup.sh

if ! "$python" -c "import atheris" >/dev/null 2>&1; then
    if ! "$python" -m pip install --quiet --disable-pip-version-check -r requirements-fuzz.txt; then
        # No wheel for this Python: build atheris from source against clang's libFuzzer.
        if ! command -v clang >/dev/null 2>&1; then
            if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
            echo "fuzz: installing clang and libFuzzer from Debian's packages" >&2
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
                clang libclang-rt-dev >/dev/null 2>&1 \
                || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
                    --no-install-recommends clang libclang-rt-14-dev >/dev/null
        fi
        CLANG_BIN=$(command -v clang) "$python" -m pip install --quiet \
            --disable-pip-version-check --no-binary atheris -r requirements-fuzz.txt
    fi
fi

mkdir -p .fuzz
status=0
for target in server client; do
    if [ "$which" != both ] && [ "$which" != "$target" ]; then continue; fi
    corpus=.fuzz/corpus-$target
    mkdir -p "$corpus"
    echo "== fuzzing the $target for ${seconds}s (corpus $corpus)"
    "$python" "tests/fuzz/fuzz_$target.py" "$corpus" "tests/fuzz/seeds/$target" \
        -max_total_time="$seconds" -max_len=4096 -dict=tests/fuzz/http.dict \
        -artifact_prefix=.fuzz/ -print_final_stats=1 || status=$?
done
exit $status
