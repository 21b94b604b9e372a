#!/usr/bin/env bash
# Makes sure the headless browser the browser tests drive is installed: Debian's `chromium`
# (/usr/bin/chromium) and `chromium-driver` (/usr/bin/chromedriver), installed with apt-get when
# missing. Fails loudly when they cannot be installed.
set -euo pipefail

say() { echo "provision-chromium: $*" >&2; }

chromium=/usr/bin/chromium
chromedriver=/usr/bin/chromedriver

installed() {
  [ -x "$chromium" ] && [ -x "$chromedriver" ]
}

if ! installed; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "chromium and chromedriver are missing and apt-get is unavailable: install the Debian packages chromium and chromium-driver"
    exit 1
  fi
  say "installing chromium and chromium-driver with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    say "apt-get could not install chromium and chromium-driver"
    exit 1
  fi
fi

installed || {
  say "chromium or chromedriver is still missing ($chromium, $chromedriver)"
  exit 1
}
version=$("$chromedriver" --version 2>&1) || {
  say "$chromedriver does not run: $version"
  exit 1
}
say "ready: $version"
