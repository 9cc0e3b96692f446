#!/usr/bin/env bash
# Install Funnel and its test tools into the current Python environment.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"

# redis-server (Debian package) for the Redis user-state tests and `funnel serve --state redis://`.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root="sudo -n"
    else
        as_root="unavailable"
    fi
    if [ "$as_root" != unavailable ] && command -v apt-get >/dev/null 2>&1; then
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    else
        echo "setup.sh: redis-server is missing and cannot be installed here (needs apt-get and root or passwordless sudo); the Redis tests will skip" >&2
    fi
fi
