#!/usr/bin/env bash
# Debian packages the tests need, installed only when absent:
#  - the synthetic world's fonts (train: DejaVu + Liberation; held-out renderer: FreeFont);
#  - Chromium for the browser test (tests/browser): Playwright drives it through executable_path
#    (`playwright install` downloads a browser and cannot work offline); the package brings its libraries.
set -euo pipefail
want=()
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || want+=(fonts-dejavu-core)
[ -f /usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf ] || want+=(fonts-liberation2)
[ -f /usr/share/fonts/truetype/freefont/FreeSans.ttf ] || want+=(fonts-freefont-ttf)
[ -x /usr/bin/chromium ] || want+=(chromium)
if [ ${#want[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null
fi
