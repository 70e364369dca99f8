#!/usr/bin/env bash
# Creates (once) and prints the path of the web front-end's virtual environment: trame-slicer 2.0 on
# slicer-core 5.11 (trame-slicer does not import with the main venv's slicer-core 5.13), Playwright and pytest;
# no torch (the dinomed children run in the main venv, scripts/env.sh). Cached outside the clone, keyed by a
# hash of web/requirements.txt and web/constraints.txt. Override the location with DINOSEG_WEB_VENV=/path.
#
# Debian packages: libosmesa6 (off-screen rendering of the views without a GPU or display) always; with
# --test also chromium (the headless browser of the tests). As root they are installed when missing;
# otherwise this prints what is missing and the tests skip saying so.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
want_browser=0
[ "${1:-}" = "--test" ] && want_browser=1

missing=()
if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } | grep -q 'libOSMesa\.so'; then missing+=(libosmesa6); fi
if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[dinoseg] installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "[dinoseg] missing Debian packages (install them as root): ${missing[*]}" >&2
    fi
fi

# the cached-venv steps of scripts/env.sh, copied on purpose: a second venv with other pins (slicer-core 5.11 for
# trame-slicer), and each script stays runnable on its own from a fresh clone
key=$(cat "$root/web/requirements.txt" "$root/web/constraints.txt" | sha256sum | cut -c1-12)
venv=${DINOSEG_WEB_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/dinoseg/web-venv-$key}
py=${PYTHON:-python3}
if [ ! -f "$venv/.complete" ]; then
    echo "[dinoseg] creating the web environment $venv (first run only)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -c "$root/web/constraints.txt" -r "$root/web/requirements.txt" >&2
    touch "$venv/.complete"
fi
echo "$venv"
