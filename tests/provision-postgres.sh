#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use is reachable: MERIDIAN_TEST_DATABASE_URL if set,
# else the local cluster on 127.0.0.1:5432 — started if it is down, installed with apt if it is
# missing (trust auth on loopback, for tests only). Fails loudly when none of that works.
set -euo pipefail

url="${MERIDIAN_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
say() { echo "provision-postgres: $*" >&2; }

reachable() {
  if command -v psql >/dev/null 2>&1; then
    psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

wait_ready() {
  for _ in $(seq 1 60); do
    reachable && return 0
    sleep 0.5
  done
  return 1
}

if reachable; then say "PostgreSQL reachable at ${url%%@*}@…"; exit 0; fi

if [ -n "${MERIDIAN_TEST_DATABASE_URL:-}" ]; then
  say "MERIDIAN_TEST_DATABASE_URL is set but PostgreSQL there is not reachable"; exit 1
fi

start_local() {
  local v
  v=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$v" ] || return 1
  say "starting local cluster $v/main"
  pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
  wait_ready
}

if ! start_local; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "PostgreSQL is not installed and apt-get is unavailable: install PostgreSQL or set MERIDIAN_TEST_DATABASE_URL"; exit 1
  fi
  say "installing PostgreSQL with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql postgresql-client >/dev/null
  v=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba="/etc/postgresql/$v/main/pg_hba.conf"
  if ! grep -q 'meridian-tests' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust # meridian-tests\nhost all all ::1/128 trust # meridian-tests' "$hba"
  fi
  start_local || { say "PostgreSQL was installed but does not start"; exit 1; }
fi
reachable || { say "PostgreSQL is still not reachable at $url"; exit 1; }
say "PostgreSQL ready"
