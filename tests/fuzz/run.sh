#!/bin/sh
# tests/fuzz/run.sh [SECONDS] - builds the libFuzzer targets with clang in
# build-fuzz (only the fuzz targets and their common/ sources), replays every
# input under tests/fuzz/regress/<target>/ (plus generated ones too big to
# keep), then fuzzes each target for SECONDS (default 20) starting from a
# temporary copy of tests/fuzz/corpus/<target>/. New inputs are never written
# into the repository. Exits non-zero on a crash, naming the input that
# crashed (kept under build-fuzz/artifacts/).
#
# Environment: FUZZ_BUILD_DIR (default build-fuzz), JOBS (default 2),
# FUZZ_TARGETS (default: all four).
set -eu

seconds=${1:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
targets=${FUZZ_TARGETS:-"fuzz_dsscan fuzz_wire fuzz_match fuzz_part10"}
artifacts=$build/artifacts
work=$(mktemp -d /tmp/spfuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM

command -v clang >/dev/null || { echo "fuzz: clang is not installed" >&2; exit 2; }
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DSP_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j"${JOBS:-2}" --target $targets >/dev/null

# Inputs too big to keep in the repository: the 6,000-deep nest of
# undefined-length sequences that overflows DCMTK's stack, in implicit VR
# (first byte 0 selects the syntax in fuzz_dsscan, the second the chunk).
mkdir -p "$work/regress-gen"
/usr/bin/python3 - "$work/regress-gen/nest6000_implicit" <<'PY'
import struct, sys
sq = struct.pack('<HHI', 0x0040, 0xA730, 0xFFFFFFFF)
item = struct.pack('<HHI', 0xFFFE, 0xE000, 0xFFFFFFFF)
leaf = struct.pack('<HHI', 0x0010, 0x0010, 4) + b'A^B '
close = struct.pack('<HHI', 0xFFFE, 0xE00D, 0) + struct.pack('<HHI', 0xFFFE, 0xE0DD, 0)
open(sys.argv[1], 'wb').write(b'\x00\x07' + (sq + item) * 6000 + leaf + close * 6000)
PY

status=0
report() { # target log
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$2" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$2" | tail -n 1)
    echo "fuzz: $1: ${execs:-?} execs, ${rate:-?}/s"
}
crashed() { # target log
    input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$2" | tail -n 1)
    echo "fuzz: $1 CRASHED on ${input:-an input (see log)}; log: $2" >&2
    tail -n 40 "$2" >&2
}

for t in $targets; do
    mkdir -p "$artifacts/$t" "$work/$t"
    log=$artifacts/$t.log
    # Replay: libFuzzer runs each file given as an argument once.
    set -- "$root/tests/fuzz/corpus/$t"/*
    if [ -d "$root/tests/fuzz/regress/$t" ]; then
        set -- "$@" "$root/tests/fuzz/regress/$t"/*
    fi
    if [ "$t" = fuzz_dsscan ]; then
        set -- "$@" "$work/regress-gen"/*
    fi
    if ! "$build/$t" -artifact_prefix="$artifacts/$t/" "$@" >"$log" 2>&1; then
        echo "fuzz: $t fails on a corpus or regression input" >&2
        crashed "$t" "$log"
        status=1
        continue
    fi
    # Fuzz from a copy of the corpus; findings go to artifacts, not the repository.
    cp "$root/tests/fuzz/corpus/$t"/* "$work/$t"/
    if ! "$build/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len=16384 -print_final_stats=1 -artifact_prefix="$artifacts/$t/" \
        "$work/$t" >"$log" 2>&1; then
        crashed "$t" "$log"
        status=1
        continue
    fi
    report "$t" "$log"
done
exit $status
