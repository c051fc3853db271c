#!/usr/bin/env bash
# deploy/local-cluster.sh - a whole ShardPACS cluster on this machine, on
# loopback, for trying it out, demos and tests.
#
#   local-cluster.sh up DIR [--nodes N] [--port P] [--replicas R] [--quorum W]
#                           [--move-dest AE=HOST:PORT]...
#   local-cluster.sh down DIR
#   local-cluster.sh status DIR
#
# `up` installs missing Debian packages and builds first (so it is a complete
# set-up command on a fresh Debian 12 machine), then generates CURVE keys and
# configuration under DIR, starts N storage nodes n1..nN (default 3) and one
# router (DICOM port P, default 11112, AE title SHARDPACS; N replicas default
# 3, write quorum default 2) and returns once C-ECHO answers.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build=${SHARDPACS_BUILD_DIR:-$root/build}
export TCP_NODELAY=1 # DCMTK tools used here (echoscu) must not wait on Nagle

die() { echo "local-cluster: $*" >&2; exit 1; }

usage() {
  sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

build_all() {
  "$root/deploy/install-deps.sh"
  if [[ ! -f "$build/CMakeCache.txt" ]]; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  fi
  cmake --build "$build" -j"$(nproc)" --target shardpacs shardpacs-node shardpacs-router \
    >"$build/local-cluster-build.log" 2>&1 || die "build failed; see $build/local-cluster-build.log"
}

# Waits until file $1 exists or process $2 dies; $3 names it for errors.
wait_for_file() {
  local file=$1 pid=$2 what=$3
  for _ in $(seq 1 500); do
    [[ -s "$file" ]] && return 0
    kill -0 "$pid" 2>/dev/null || die "$what exited; see its log"
    sleep 0.02
  done
  die "$what did not become ready"
}

pubkey() { sed -n 's/^public-key = //p' "$1"; }

cmd_up() {
  local dir=$1; shift
  local nodes=3 port=11112 replicas=3 quorum=2 dests=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --replicas) replicas=$2; shift 2 ;;
      --quorum) quorum=$2; shift 2 ;;
      --move-dest) dests+=("$2"); shift 2 ;;
      *) usage ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ && $nodes -ge 1 ]] || die "--nodes must be a positive number"
  (( quorum <= replicas )) || quorum=$replicas
  if [[ -f "$dir/router.pid" ]] && kill -0 "$(cat "$dir/router.pid")" 2>/dev/null; then
    die "a cluster is already running in $dir (local-cluster.sh down $dir first)"
  fi
  build_all
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local bin=$build

  # Keys: one pair per member plus an operator key; all listed in cluster.keys.
  : >"$dir/cluster.keys.new"
  for i in $(seq 1 "$nodes"); do
    mkdir -p "$dir/n$i"
    [[ -f "$dir/n$i/node.key" ]] || "$bin/shardpacs" keygen "$dir/n$i/node.key" "$dir/n$i/node.pub" >/dev/null
    echo "$(pubkey "$dir/n$i/node.key") n$i" >>"$dir/cluster.keys.new"
  done
  for who in router admin; do
    [[ -f "$dir/$who.key" ]] || "$bin/shardpacs" keygen "$dir/$who.key" >/dev/null
    echo "$(pubkey "$dir/$who.key") $who" >>"$dir/cluster.keys.new"
  done
  mv "$dir/cluster.keys.new" "$dir/cluster.keys"

  # Storage nodes on free loopback ports (each reports the port it got). n1
  # starts first; the others join its gossip through it as their seed.
  local seeds=""
  for i in $(seq 1 "$nodes"); do
    local n=$dir/n$i
    cat >"$n/node.conf" <<CONF
[node]
id = n$i
listen = tcp://127.0.0.1:*
data_dir = data
[keys]
key_pair = node.key
cluster_keys = ../cluster.keys
[cluster]
seeds = $seeds
CONF
    rm -f "$n/ready"
    nohup "$bin/shardpacs-node" --config "$n/node.conf" --ready-file "$n/ready" \
      >>"$n/node.log" 2>&1 &
    echo $! >"$n/node.pid"
    if [[ $i -eq 1 ]]; then
      wait_for_file "$n/ready" "$(cat "$n/node.pid")" "node n1"
      seeds="n1@$(cat "$n/ready")"
    fi
  done
  {
    cat <<CONF
[dicom]
ae_title = SHARDPACS
bind = 127.0.0.1
port = $port
[keys]
key_pair = router.key
cluster_keys = cluster.keys
[cluster]
replicas = $replicas
write_quorum = $quorum
[nodes]
CONF
    for i in $(seq 1 "$nodes"); do
      wait_for_file "$dir/n$i/ready" "$(cat "$dir/n$i/node.pid")" "node n$i"
      echo "n$i = $(cat "$dir/n$i/ready")"
    done
    echo "[destinations]"
    for d in "${dests[@]+"${dests[@]}"}"; do
      echo "${d%%=*} = ${d#*=}"
    done
  } >"$dir/router.conf"

  nohup "$bin/shardpacs-router" --config "$dir/router.conf" >>"$dir/router.log" 2>&1 &
  echo $! >"$dir/router.pid"
  for _ in $(seq 1 250); do
    if echoscu -to 2 -aec SHARDPACS 127.0.0.1 "$port" >/dev/null 2>&1; then
      cat <<EOT
ShardPACS is up: $nodes storage nodes, router AE SHARDPACS on 127.0.0.1:$port (N=$replicas, W=$quorum).
Files, keys and logs: $dir
  Send:      storescu -aec SHARDPACS 127.0.0.1 $port FILE.dcm ...
  Find:      findscu -S -aec SHARDPACS -k QueryRetrieveLevel=STUDY -k PatientName='*' -k StudyInstanceUID 127.0.0.1 $port
  Retrieve:  getscu -aec SHARDPACS -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=UID -od OUTDIR 127.0.0.1 $port
  (set TCP_NODELAY=1 in the environment of DCMTK tools, or each exchange waits on Nagle)
  Status:    $0 status $dir      Stop: $0 down $dir
EOT
      return 0
    fi
    kill -0 "$(cat "$dir/router.pid")" 2>/dev/null || die "router exited; see $dir/router.log"
    sleep 0.04
  done
  die "router does not answer C-ECHO on port $port; see $dir/router.log"
}

stop_pidfile() {
  local f=$1
  [[ -f "$f" ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_down() {
  local dir=$1
  [[ -d "$dir" ]] || die "no cluster in $dir"
  stop_pidfile "$dir/router.pid"
  for f in "$dir"/n*/node.pid; do [[ -e "$f" ]] && stop_pidfile "$f"; done
  echo "stopped the cluster in $dir"
}

cmd_status() {
  local dir=$1 bin=$build
  [[ -d "$dir" ]] || die "no cluster in $dir"
  local rpid; rpid=$(cat "$dir/router.pid" 2>/dev/null || echo 0)
  if kill -0 "$rpid" 2>/dev/null; then echo "router   running (pid $rpid)"; else echo "router   stopped"; fi
  for n in "$dir"/n*/; do
    n=${n%/}
    local name; name=$(basename "$n")
    local pid; pid=$(cat "$n/node.pid" 2>/dev/null || echo 0)
    if kill -0 "$pid" 2>/dev/null; then
      local stats
      stats=$(SHARDPACS_TIMEOUT_MS=2000 "$bin/shardpacs" node --connect "$(cat "$n/ready")" \
        --server-key "$n/node.pub" --key "$dir/admin.key" stats 2>&1 || true)
      echo "$name       running (pid $pid) $stats"
    else
      echo "$name       stopped"
    fi
  done
}

[[ $# -ge 2 ]] || usage
case $1 in
  up) shift; cmd_up "$@" ;;
  down) cmd_down "$2" ;;
  status) cmd_status "$2" ;;
  *) usage ;;
esac
