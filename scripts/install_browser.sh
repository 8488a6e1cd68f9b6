#!/usr/bin/env bash
# Install the headless browser the explorer's end-to-end tests drive (idempotent).
# Debian's `chromium` and `chromium-driver` put /usr/bin/chromium and /usr/bin/chromedriver in place;
# Selenium is pointed at them explicitly, so nothing is downloaded when the tests run.
# Without root+apt (or passwordless sudo) it only prints a note: the browser tests then skip with a reason.
set -uo pipefail

have_browser() {
    { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } \
        && { command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ]; }
}

if have_browser; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "note: chromium/chromedriver are missing and apt needs root: run" \
             "'sudo apt-get install chromium chromium-driver'; the explorer's browser tests will skip"
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "note: chromium/chromedriver are missing and apt-get is not available; install a Chromium and its" \
         "chromedriver by hand (or set VITATLAS_CHROMIUM / VITATLAS_CHROMEDRIVER); the browser tests will skip"
    exit 0
fi

if ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
        && have_browser; then
    echo "installed chromium and chromium-driver"
else
    echo "note: could not install chromium and chromium-driver with apt; the explorer's browser tests will skip"
fi
exit 0
