#!/usr/bin/env bash
# Installs Debian's Chromium for the end-to-end UI test when it is missing and we may (root + apt).
# Never fails: without a browser the UI test skips and says why.
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: /usr/bin/chromium is missing and cannot be installed here (need root + apt-get); the browser test will skip."
  exit 0
fi
echo "installing Debian's chromium for the browser test..."
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "note: apt-get install chromium failed; the browser test will skip."
exit 0
