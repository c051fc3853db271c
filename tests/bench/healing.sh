#!/usr/bin/env bash
# Self-healing benchmark: how fast a local ShardPACS cluster notices a dead
# node, how fast it restores full replication for a given volume (MB/s of
# repair while an ingest continues), and what the repair costs the ingest.
#
#   tests/bench/healing.sh [--mb MB] [--nodes N] [--ingest-small N]
#                          [--ingest-ct N] [--down-to-out DURATION]
#                          [--repair-rate RATE] [--victim nK] [--quick] [--keep]
#
#   --mb MB            512x512 CT preloaded before the kill        default 300
#   --nodes N          storage nodes (N=3 replicas, W=2)           default 4
#   --ingest-small N   64x64 CT in each timed ingest               default 1500
#   --ingest-ct N      512x512 CT in each timed ingest             default 60
#   --down-to-out D    delay before a down node is out  (local-cluster.sh: 10s)
#   --repair-rate R    bytes/s of all repair copies, 0 = unlimited (default 50M)
#   --victim nK        the node killed                             default the last
#   --quick            smoke run: --mb 60 --ingest-small 400 --ingest-ct 20
#   --keep             keep the work folder (data, cluster, logs)
#
# The cluster comes from deploy/local-cluster.sh (its demo failure timings:
# probe 500 ms, repair rounds every 2 s), everything on loopback ports chosen
# free at run time; DCMTK's storescu (TCP_NODELAY=1) sends the data. Steps:
# preload, wait for full replication; timed baseline ingest; kill -9 the
# victim; detection times from the members' own log lines (suspect, down,
# out); from the moment it is out, a second ingest of the same shape runs
# while `shardpacs status --json` is polled until no partition is
# under-replicated. Prints Markdown tables like tests/bench/ingest.sh; it
# asserts nothing about speed. Not run by CTest. Progress goes to stderr.
set -euo pipefail
export LC_ALL=C
export TCP_NODELAY=1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
for tool in storescu echoscu; do
  command -v "$tool" >/dev/null || { echo "healing.sh: $tool not found (install dcmtk)" >&2; exit 1; }
done
[[ -x /usr/bin/python3 ]] || { echo "healing.sh: /usr/bin/python3 not found" >&2; exit 1; }
exec /usr/bin/python3 "$root/tests/bench/healing.py" "$@"
