#!/usr/bin/env bash
# Makes sure libfaketime is installed: the clock test (tests/clock_skew.rs) moves a real agent
# process's wall clock with it (LD_PRELOAD). Installs the Debian package `faketime` with apt-get
# when it is missing; fails loudly when that is not possible. Idempotent.
set -euo pipefail

say() { echo "provision-faketime: $*" >&2; }

find_lib() {
  if [ -n "${MERIDIAN_TEST_LIBFAKETIME:-}" ]; then
    [ -f "$MERIDIAN_TEST_LIBFAKETIME" ] && { echo "$MERIDIAN_TEST_LIBFAKETIME"; return 0; }
    return 1
  fi
  local f
  for f in /usr/lib/*/faketime/libfaketimeMT.so.1 /usr/lib/faketime/libfaketimeMT.so.1 \
           /usr/local/lib/faketime/libfaketimeMT.so.1; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  return 1
}

if lib=$(find_lib); then say "libfaketime present: $lib"; exit 0; fi

if [ -n "${MERIDIAN_TEST_LIBFAKETIME:-}" ]; then
  say "MERIDIAN_TEST_LIBFAKETIME=$MERIDIAN_TEST_LIBFAKETIME does not exist"; exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "libfaketime is not installed and apt-get is unavailable: install libfaketime or set MERIDIAN_TEST_LIBFAKETIME"; exit 1
fi
say "installing faketime with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq faketime >/dev/null; }; then
  say "apt-get could not install faketime"; exit 1
fi
lib=$(find_lib) || { say "faketime was installed but libfaketimeMT.so.1 is not where expected"; exit 1; }
say "libfaketime ready: $lib"
