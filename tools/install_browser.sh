#!/usr/bin/env bash
# Install Debian's Chromium for the HTML report's browser test (tests/test_html_report.py).
#
# Why a script: a fresh CI machine has no browser, and downloaded browser builds (Playwright,
# Puppeteer) cannot be fetched here; Debian's package can. Idempotent: does nothing when
# /usr/bin/chromium exists. When it cannot install (not root, no apt-get, FAL_D2_NO_APT=1), it
# prints one line saying why and exits 0, and the browser test then skips with the same reason.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "${FAL_D2_NO_APT:-0}" = "1" ]; then
    echo "[install_browser] skipped: FAL_D2_NO_APT=1 forbids apt-get; the browser test will skip"
    exit 0
fi
if [ "$EUID" -ne 0 ]; then
    echo "[install_browser] skipped: not root, cannot apt-get install chromium; the browser test will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_browser] skipped: no apt-get on this machine; the browser test will skip"
    exit 0
fi

echo "[install_browser] installing Debian's chromium (first time on this machine only)"
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "[install_browser] chromium installed in $((SECONDS - start)) s: $("$CHROMIUM" --version 2>/dev/null)"
else
    echo "[install_browser] skipped: apt-get install chromium failed; the browser test will skip"
fi
