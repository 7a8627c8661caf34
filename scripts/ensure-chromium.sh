#!/usr/bin/env bash
# Makes sure Debian's headless Chromium and its driver are installed (the browser test of the
# medsync page, tests/test_ui_browser.py), installing them with apt when they are missing.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "chromium/chromedriver missing and no apt-get here: install them (Debian: chromium chromium-driver)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
echo "installing chromium and chromium-driver with apt" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
