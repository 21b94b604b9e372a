#!/usr/bin/env bash
# Makes sure the pinned Schemathesis the API contract test (tests/api_contract.rs) runs is
# installed: a Python virtual environment at $MERIDIAN_TEST_SCHEMATHESIS_VENV (default
# ~/.cache/meridian-schemathesis) with schemathesis==$SCHEMATHESIS_VERSION from PyPI. Needs
# Python 3.9 or newer with venv and pip; fails loudly when any of that is missing. Idempotent:
# a venv that already holds the pinned version is left alone.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
venv="${MERIDIAN_TEST_SCHEMATHESIS_VENV:-$HOME/.cache/meridian-schemathesis}"
st="$venv/bin/schemathesis"
say() { echo "provision-schemathesis: $*" >&2; }

installed() {
  [ -x "$st" ] && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$SCHEMATHESIS_VERSION" ]
}

if installed; then say "schemathesis $SCHEMATHESIS_VERSION present: $st"; exit 0; fi

python=""
for p in python3.13 python3.12 python3.11 python3.10 python3.9 python3; do
  if command -v "$p" >/dev/null 2>&1 \
    && "$p" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
    python=$(command -v "$p"); break
  fi
done
if [ -z "$python" ]; then
  say "no Python 3.9+ with the venv module: install python3 and python3-venv"; exit 1
fi

say "creating $venv with $python and installing schemathesis $SCHEMATHESIS_VERSION"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! "$python" -m venv "$venv"; then
  say "$python -m venv failed (on Debian: apt-get install python3-venv)"; exit 1
fi
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION"; then
  say "pip could not install schemathesis==$SCHEMATHESIS_VERSION"; exit 1
fi
installed || { say "schemathesis was installed but $st does not report $SCHEMATHESIS_VERSION"; exit 1; }
say "ready: $("$st" --version)"
