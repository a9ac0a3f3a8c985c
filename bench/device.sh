#!/usr/bin/env bash
# The many-core scale table (`python -m bench.scale`) on a lent many-core machine, in one call.
# That machine has Python 3.12 and no network: everything comes from .dev/, built here first:
#   bash ../shared/tools/device-bundle.sh -r bench/requirements-peers.txt uvloop
# then run there, carrying .dev:  bash bench/device.sh [bench.scale's options]
# (about 4 minutes with the defaults on 16 cores; give the call timeout_s 600). It makes the
# harness's venv (.dev/venv) and the bench's own venvs from .dev/whl, runs .dev's redis-server
# with the libraries it came with, and writes scale.md, scale.json and scale.log to $OUT
# ($SCALE_NAME.md and so on if set: a second run in the same call, e.g. with --prefetch 15).
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${FLEETD_DEV:-$PWD/.dev}
out=${OUT:-$PWD/.dev/out}
if [ ! -d "$dev/whl" ] || [ ! -x "$dev/bin/redis-server" ]; then
  echo "bench/device.sh: $dev has no wheels or redis-server: build it first (see the header)" >&2
  exit 2
fi
mkdir -p "$out"
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$dev/whl PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# redis-server with its own libraries; nothing else sees them (Python has its own libssl).
wrapped=$(mktemp -d)
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$dev/lib" "$dev/bin/redis-server" \
  > "$wrapped/redis-server"
chmod +x "$wrapped/redis-server"
export PATH=$wrapped:$PATH
name=${SCALE_NAME:-scale}
{ echo "cores: $(nproc)"; python3 --version; redis-server --version; } | tee "$out/$name.log"
python3 -m venv "$dev/venv"
"$dev/venv/bin/pip" install -q psutil redis
"$dev/venv/bin/python" -m bench.scale "$@" --output "$out/$name.md" 2>&1 | tee -a "$out/$name.log"
