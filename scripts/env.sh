#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtual environment.
# The venv is cached outside the clone, keyed by a hash of constraints.txt and core_lib/pyproject.toml,
# so a fresh clone reuses it and a change of dependencies builds a new one.
# Override the location with DINOSEG_VENV=/path.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# (scripts/web_env.sh repeats these cached-venv steps for the web front-end's separate venv, on purpose)
key=$(cat "$root/constraints.txt" "$root/core_lib/pyproject.toml" | sha256sum | cut -c1-12)
venv=${DINOSEG_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/dinoseg/venv-$key}
py=${PYTHON:-python3}
if [ ! -f "$venv/.complete" ]; then
    echo "[dinoseg] creating virtual environment $venv (first run only; torch is large)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # torch first, alone, so that pip takes the release named in constraints.txt (on this machine: from local disk)
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" torch torchvision >&2
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root/core_lib[test,slicer]" >&2
    touch "$venv/.complete"
else
    # the editable install points at the clone it was made from: repoint it at this clone when needed
    if ! "$venv/bin/python" -c "import dinomed,sys,os; sys.exit(0 if os.path.realpath(dinomed.__file__).startswith(os.path.realpath('$root')) else 1)" 2>/dev/null; then
        "$venv/bin/python" -m pip install -q --no-deps -e "$root/core_lib" >&2
    fi
fi
echo "$venv"
