#!/usr/bin/env bash
# Installs every Debian package ShardPACS needs to build, test and benchmark.
# Idempotent: installs only what is missing and prints nothing when all is
# there. Needs root (or sudo) only when something is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config                # toolchain
  libzmq3-dev libsodium-dev librocksdb-dev        # transport, crypto, storage
  libprotobuf-c-dev protobuf-c-compiler           # wire messages
  libinih-dev                                     # configuration files
  libjansson-dev                                  # JSON output of the admin CLI, DICOMweb
  libmicrohttpd-dev libgnutls28-dev               # the router's HTTP(S) front door
  zlib1g-dev                                      # deflated data sets (common/dsscan.c)
  clang                                           # libFuzzer targets (tests/fuzz/run.sh)
  libdcmtk-dev dcmtk                              # DICOM (router, test clients)
  libcmocka-dev                                   # unit tests
  clang-format                                    # format check (tests/check-format.sh)
  python3-pytest python3-pydicom python3-numpy    # process and cluster tests
  python3-zmq                                     # (a raw ZeroMQ peer in the tests)
  python3-requests openssl                        # DICOMweb tests (HTTP client, test certificates)
  iproute2 iptables                               # network namespaces (test_partitions.py)
  orthanc orthanc-dicomweb curl                   # benchmark anchors (tests/bench/ingest.sh, dicomweb.py)
  chromium                                        # browser test of the viewer (tests/cluster/test_viewer.py)
  python3-cryptography                            # TLS test certificates (tests/cluster/tlscerts.py)
  prometheus                                      # promtool and a scraper (tests/cluster/test_admin.py)
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
