#!/usr/bin/env bash
# Prepare a machine for pht: a virtual environment in .venv with pht and its
# test tools, plus the real programs the tests drive (curl, nginx, squid).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r requirements-dev.txt -e '.[cli]'
# atheris (coverage-guided fuzzing) ships wheels for CPython <= 3.11 on x86_64;
# elsewhere scripts/fuzz.sh builds it, and the fuzz smoke tests say they skip.
if .venv/bin/python -c 'import sys, platform; sys.exit(not (sys.version_info < (3, 12) and platform.machine() == "x86_64"))'; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-fuzz.txt
fi

# System programs the end-to-end tests talk to. Only with --system (the test
# command passes it); the demo needs none of them.
if [ "${1:-}" = "--system" ]; then
    missing=()
    for pair in curl:curl nginx:nginx squid:squid; do
        cmd=${pair%%:*}; pkg=${pair##*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        echo "setup: installing ${missing[*]} from Debian's packages" >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        # Debian starts the daemons it installs; the tests run their own.
        for svc in nginx squid; do
            $SUDO systemctl stop "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
        done
    fi
fi
