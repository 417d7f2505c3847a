#!/usr/bin/env bash
# Prepare this checkout for pht: a virtual environment in .venv, and what a
# profile needs on top of it.
#
#   scripts/setup.sh demo      pht and its runtime dependencies, and curl
#                              (what scripts/demo.sh uses; nothing else)
#   scripts/setup.sh           pht, plus PyYAML (the cli extra) and the test,
#                              docs and fuzz tools (requirements-*.txt)
#   scripts/setup.sh test      the same, plus curl, nginx and squid, which the
#                              end-to-end tests drive, and valgrind, which
#                              benchmarks/instructions.py counts instructions
#                              with (--system is the old name)
#
# Safe to run again: a stamp in .venv remembers what was installed from which
# pyproject.toml and requirements files, and only a change reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-dev}
case "$profile" in
    demo | dev | test) ;;
    --system) profile=test ;;
    *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=""

say() { echo "setup: $*" >&2; }

apt_install() {
    say "installing $* from Debian's packages"
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

# --- Python and its venv module ---------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    say "pht needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)"
    exit 1
fi
# Debian splits venv's pip bootstrap (ensurepip) into python3-venv.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    say "$PYTHON -m venv cannot bootstrap pip here"
    apt_install python3-venv || apt_install "python$version-venv"
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    say "creating .venv with $("$PYTHON" -V)"
    rm -rf .venv
    "$PYTHON" -m venv .venv
    pip install --quiet --upgrade pip
fi

# --- Python packages, once per content of the files that list them ----------
installed() {  # installed NAME FILES...: true when NAME's stamp matches FILES
    local stamp=.venv/.pht-setup-$1
    shift
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(cat "$@" | sha256sum)" ]
}
stamp() {
    local stamp=.venv/.pht-setup-$1
    shift
    cat "$@" | sha256sum >"$stamp"
}

# A checkout set up before the distribution was renamed has an editable "pht".
if [ -d .venv/lib ] && compgen -G ".venv/lib/python*/site-packages/pht-*.dist-info" >/dev/null; then
    say "removing the old 'pht' distribution (now 'pht-tunnel')"
    pip uninstall --quiet --yes pht
    rm -f .venv/.pht-setup-*
fi

if ! installed runtime pyproject.toml; then
    say "installing pht (editable) and its dependencies: h11, trio, cryptography, pybase64"
    pip install --quiet -e .
    stamp runtime pyproject.toml
fi

if [ "$profile" != demo ]; then
    # atheris (coverage-guided fuzzing) ships wheels for CPython <= 3.11 on
    # x86_64; elsewhere scripts/fuzz.sh builds it, and the fuzz smoke tests skip.
    dev_files=(pyproject.toml requirements-dev.txt requirements-docs.txt)
    fuzz=""
    if .venv/bin/python -c 'import sys, platform; sys.exit(not (sys.version_info < (3, 12) and platform.machine() == "x86_64"))'; then
        dev_files+=(requirements-fuzz.txt)
        fuzz=1
    fi
    if ! installed dev "${dev_files[@]}"; then
        # requirements-dev.txt pins PyYAML, the cli extra's one package.
        say "installing PyYAML and the test, docs${fuzz:+ and fuzz} tools (${dev_files[*]:1})"
        requirements=()
        for file in "${dev_files[@]:1}"; do requirements+=(-r "$file"); done
        pip install --quiet "${requirements[@]}"
        stamp dev "${dev_files[@]}"
    fi
fi

# --- System programs ---------------------------------------------------------
case "$profile" in
    demo) programs=(curl) ;;
    test) programs=(curl nginx squid valgrind) ;;
    *) programs=() ;;
esac
missing=()
for program in "${programs[@]}"; do
    if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
        missing+=("$program")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
    # Debian starts the daemons it installs; the tests run their own.
    for svc in nginx squid; do
        if [[ " ${missing[*]} " == *" $svc "* ]]; then
            $SUDO systemctl stop "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
fi
say "ready ($profile)"
