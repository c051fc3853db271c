#!/usr/bin/env bash
# The test command: installs what is missing, configures, builds and runs
# every test through CTest (labels unit, cluster and lint), then builds the
# unit tests again with ASan+UBSan in a second folder and runs them there,
# then runs each fuzzer for a bounded time.
# Exits non-zero on any failure.
#
#   tests/run.sh           everything (what CI runs, through .ci/run)
#   tests/run.sh --quick   the inner loop: builds the unit tests only and
#                          runs them (ctest -L unit), seconds after a build
#
# SP_BUILD_DIR is the build folder (default: build/ in the repository); the
# ASan+UBSan unit build goes to "$SP_BUILD_DIR-asan", the fuzzers to
# "$SP_BUILD_DIR-fuzz" (FUZZ_SECONDS per fuzzer, default 20; 0 skips them).
# SANITIZE=ON builds the main folder with ASan+UBSan too (every test,
# cluster tests included).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
for old in BUILD_DIR SHARDPACS_BUILD_DIR; do
  if [[ -n ${!old:-} ]]; then
    echo "run.sh: $old is no longer read; set SP_BUILD_DIR instead" >&2
    exit 2
  fi
done
build=${SP_BUILD_DIR:-$root/build}
quick=0
case ${1:-} in
  "") ;;
  --quick) quick=1 ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

configure() { # configure DIR SANITIZE
  cmake -S "$root" -B "$1" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSP_SANITIZE="$2" >/dev/null
}

"$root/deploy/install-deps.sh"
start=$SECONDS
if ((quick)); then
  configure "$build" "${SANITIZE:-OFF}"
  cmake --build "$build" -j"$(nproc)" --target unit_tests
  (cd "$build" && ctest --output-on-failure -j2 -L unit)
  echo "run.sh: unit tests passed in $((SECONDS - start)) s"
  exit 0
fi

configure "$build" "${SANITIZE:-OFF}"
cmake --build "$build" -j"$(nproc)"
(cd "$build" && ctest --output-on-failure -j2 --timeout 900)
main_s=$((SECONDS - start))

# The unit tests once more under AddressSanitizer and UBSan (any report
# fails the test: leaks, overflows, use after free, undefined behaviour).
start=$SECONDS
configure "$build-asan" ON
cmake --build "$build-asan" -j"$(nproc)" --target unit_tests
(cd "$build-asan" &&
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure -j2 -L unit)
asan_s=$((SECONDS - start))

# The fuzzers (libFuzzer, clang) for a bounded time each: the data set
# pre-scan, the wire decoder, the matching rules and the Part-10 framing,
# after replaying their seed corpora and regression inputs.
start=$SECONDS
fuzz_s=${FUZZ_SECONDS:-20}
if [[ $fuzz_s != 0 ]]; then
  FUZZ_BUILD_DIR="$build-fuzz" "$root/tests/fuzz/run.sh" "$fuzz_s"
fi
echo "run.sh: all passed; build and tests ${main_s} s, ASan+UBSan unit tests ${asan_s} s," \
  "fuzzers $((SECONDS - start)) s"
