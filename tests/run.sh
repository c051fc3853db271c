#!/usr/bin/env bash
# The test command: installs what is missing, configures, builds and runs
# every test (unit and process/cluster) through CTest. Exits non-zero on any
# failure. Options: BUILD_DIR (default build), SANITIZE=1 for ASan+UBSan.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}

"$root/deploy/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSP_SANITIZE=${SANITIZE:-OFF} >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j2 --timeout 900
