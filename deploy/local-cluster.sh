#!/usr/bin/env bash
# deploy/local-cluster.sh - a whole ShardPACS cluster on this machine, on
# loopback, for trying it out, demos and tests.
#
#   local-cluster.sh up DIR [--nodes N] [--port P] [--replicas R] [--quorum W]
#                           [--sites A,A,B] [--down-to-out DURATION]
#                           [--repair-rate RATE] [--move-dest 'AE=HOST:PORT [tls]']...
#                           [--tls [--tls-port P]]
#                           [--http-port H] [--viewer-dir DIR | --viewer | --no-viewer]
#   local-cluster.sh down DIR
#   local-cluster.sh status DIR [--json]
#   local-cluster.sh add-node DIR [--site S]
#   local-cluster.sh kill-node DIR nK          (kill -9)
#   local-cluster.sh restart-node DIR nK       (same port, same data)
#   local-cluster.sh drain DIR nK              (streams nK's data away; it leaves)
#
# `up` installs missing Debian packages and builds first (so it is a complete
# set-up command on a fresh Debian 12 machine), then generates CURVE keys and
# configuration under DIR, starts N storage nodes n1..nN (default 3; n1 is
# the others' gossip seed) and one router (DICOM port P, default 11112, AE
# title SHARDPACS; N replicas default 3, write quorum default 2) that joins
# the gossip through the nodes, and returns once C-ECHO answers and every
# node is alive. --sites gives each node its site (failure domain), in
# order. Failure timings are demo-friendly: probes every 500 ms, a dead node
# is out (its partitions re-replicated) 10 s after it went down
# (--down-to-out), repair rounds every 2 s, a scrubber pass every 60 s.
# The router also serves DICOMweb over HTTP on 127.0.0.1:H (default 8042;
# 0 turns it off) with authentication: user "admin" with a random password
# written to DIR/http.password, a token key in DIR/token.key; --viewer-dir
# serves a web viewer's built site at /viewer/. Without --viewer-dir, and
# when npm is installed, `up` installs the OHIF Viewer (deploy/viewer.sh:
# @ohif/app from the npm registry, cached in DIR/viewer-npm/) into
# DIR/viewer and serves it; a failed download is a warning (--viewer makes
# it an error, --no-viewer skips it). The viewer's page sends a demo user's
# credentials (user "viewer", password in DIR/viewer.password) with its
# DICOMweb requests: for a local demo only (anyone reaching the port can
# read them from /viewer/app-config.js).
#
# --tls makes a local CA, a router certificate and a client certificate
# (openssl, EC P-256, under DIR/tls/; kept when present), serves DICOM TLS
# on port 2762 (--tls-port) beside the plain port with client certificates
# required ([tls] verify_peer), and prints a working storescu +tls line.
#
# `status` prints the process table and `shardpacs status` as the first node
# that answers sees the cluster; with --json that command's JSON, plus a
# "dicom" object naming the DICOM ports, and with TLS the CA, client
# certificate and client key files, and an "http" object: the DICOMweb base
# URL, the viewer URL (null without a viewer), the CA file (null: plain
# HTTP) and the users' credentials, and a "processes" list with each
# process's metrics, healthz and readyz URLs (every process serves its
# admin port on a loopback port picked at up and kept in DIR/nK/admin.port,
# DIR/router.admin.port).
# `add-node` makes the next free nK (key appended to DIR/cluster.keys, which
# running members re-read), starts it with every node as seed and waits until
# the others see it; it announces itself alive after its first repair round.
#
# The programs are built in SP_BUILD_DIR (default: build/ in the repository).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
[[ -z ${SHARDPACS_BUILD_DIR:-} ]] || {
  echo "local-cluster: SHARDPACS_BUILD_DIR is no longer read; set SP_BUILD_DIR instead" >&2
  exit 2
}
build=${SP_BUILD_DIR:-$root/build}
bin=$build
export TCP_NODELAY=1 # DCMTK tools used here (echoscu) must not wait on Nagle
PY=/usr/bin/python3

die() { echo "local-cluster: $*" >&2; exit 1; }

usage() {
  sed -n '5,14p' "$0" | sed 's/^# \{0,1\}//' >&2
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

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Node folders n1..nK of a cluster, in numeric order.
node_names() {
  local d
  for d in "$1"/n*/; do
    d=${d%/}
    [[ -f $d/node.conf ]] && basename "$d"
  done | sort -V
}

# Prints the admin (metrics, health) port kept in FILE, picking a free
# loopback port the first time so restarts keep the same one.
admin_port() {
  local file=$1
  if [[ ! -s $file ]]; then
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' >"$file"
  fi
  cat "$file"
}

# Writes DIR/nK/node.conf from the settings in DIR/cluster.env.
# write_node_conf DIR K SITE SEEDS [LISTEN]
write_node_conf() {
  local dir=$1 k=$2 site=$3 seeds=$4 listen=${5:-tcp://127.0.0.1:*}
  # shellcheck disable=SC1091
  source "$dir/cluster.env"
  {
    echo "[node]"
    echo "id = n$k"
    echo "listen = $listen"
    [[ -n $site ]] && echo "site = $site"
    echo "data_dir = data"
    echo "[keys]"
    echo "key_pair = node.key"
    echo "cluster_keys = ../cluster.keys"
    echo "[cluster]"
    echo "replicas = $REPLICAS"
    echo "seeds = $seeds"
    gossip_conf
    echo "[repair]"
    echo "interval = $REPAIR_INTERVAL"
    echo "rate = $REPAIR_RATE"
    echo "scrub_interval = $SCRUB_INTERVAL"
    echo "[admin]"
    echo "listen = 127.0.0.1:$(admin_port "$dir/n$k/admin.port")"
  } >"$dir/n$k/node.conf"
}

# The [gossip] section shared by nodes and the router (cluster.env sourced).
gossip_conf() {
  echo "[gossip]"
  echo "probe_interval = $PROBE_INTERVAL"
  echo "probe_timeout = $PROBE_TIMEOUT"
  echo "sync_interval = $SYNC_INTERVAL"
  echo "down_to_out = $DOWN_TO_OUT"
}

# Makes later starts of node nK listen where this start got its port, so a
# restarted node comes back where the others know it.
pin_listen() {
  local n=$1
  sed -i "s|^listen = .*|listen = $(cat "$n/ready")|" "$n/node.conf"
}

# Rewrites the seeds of node folder $2 to every other node of cluster $1
# (read at the node's next start).
set_seeds() {
  local dir=$1 me=$2 seeds="" m
  for m in $(node_names "$dir"); do
    [[ $m == "$me" || ! -s $dir/$m/ready ]] && continue
    seeds+="${seeds:+,}$m@$(cat "$dir/$m/ready")"
  done
  sed -i "s|^seeds = .*|seeds = $seeds|" "$dir/$me/node.conf"
}

# Starts node folder $1 (named $2) in the background; returns once it wrote
# its ready file (its bound endpoint).
start_node() {
  local n=$1 name=$2
  rm -f "$n/ready"
  nohup "$bin/shardpacs-node" --config "$n/node.conf" --ready-file "$n/ready" \
    >>"$n/node.log" 2>&1 &
  echo $! >"$n/node.pid"
  wait_for_file "$n/ready" "$(cat "$n/node.pid")" "node $name"
}

# Prints `shardpacs status` (ARGS, e.g. --json) as the first running node
# that answers sees the cluster; fails when none answers.
cluster_status() {
  local dir=$1; shift
  local m out
  for m in $(node_names "$dir"); do
    running "$dir/$m/node.pid" && [[ -s $dir/$m/ready ]] || continue
    if out=$(SHARDPACS_TIMEOUT_MS=${SHARDPACS_TIMEOUT_MS:-2000} "$bin/shardpacs" status \
               --connect "$(cat "$dir/$m/ready")" --server-key "$dir/$m/node.pub" \
               --key "$dir/admin.key" "$@" 2>/dev/null); then
      printf '%s\n' "$out"
      return 0
    fi
  done
  return 1
}

# Evaluates the Python expression $2 over the status JSON (as `s`; `m` maps
# member id to member) of cluster $1; succeeds when it is true.
status_is() {
  local json
  json=$(cluster_status "$1" --json) || return 1
  "$PY" -c '
import json, sys
s = json.loads(sys.stdin.read())
m = {x["id"]: x for x in s["members"]}
sys.exit(0 if eval(sys.argv[1]) else 1)' "$2" <<<"$json"
}

# Waits (at most $3 seconds) until status_is $1 $2.
wait_status() {
  local dir=$1 expr=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    status_is "$dir" "$expr" && return 0
    sleep 0.1
  done
  return 1
}


# Makes DIR/tls/{ca,server,client}.{pem,key} with the openssl command line
# unless they exist: a local CA, the router's certificate (localhost and
# 127.0.0.1; also its client certificate for C-MOVE over TLS) and a client
# certificate for DICOM tools.
make_tls_files() {
  local t=$1/tls
  mkdir -p "$t"
  [[ -s $t/ca.pem && -s $t/server.pem && -s $t/client.pem ]] && return 0
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  {
    openssl req -x509 "${ec[@]}" -keyout "$t/ca.key" -out "$t/ca.pem" -days 825 \
      -subj "/O=ShardPACS local/CN=ShardPACS local CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    local who cn ext
    for who in server client; do
      cn=$([[ $who == server ]] && echo router || echo dicom-client)
      ext="basicConstraints=CA:FALSE"
      if [[ $who == server ]]; then
        ext+=$'\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth'
      else
        ext+=$'\nextendedKeyUsage=clientAuth'
      fi
      openssl req "${ec[@]}" -keyout "$t/$who.key" -out "$t/$who.csr" \
        -subj "/O=ShardPACS local/CN=$cn"
      openssl x509 -req -in "$t/$who.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
        -out "$t/$who.pem" -days 825 -extfile <(printf '%s\n' "$ext")
      rm -f "$t/$who.csr"
    done
  } >"$t/openssl.log" 2>&1 || die "openssl failed; see $t/openssl.log"
  chmod 600 "$t"/*.key
}

cmd_up() {
  local dir=$1; shift
  local nodes=3 port=11112 replicas=3 quorum=2 dests=() sites="" down_to_out=10s rate=50M
  local tls=0 tls_port=2762
  local http_port=8042 viewer_dir="" viewer=auto
  while [[ $# -gt 0 ]]; do
    case $1 in
      --http-port) http_port=$2; shift 2 ;;
      --viewer-dir) viewer_dir=$(cd "$2" && pwd); viewer=dir; shift 2 ;;
      --viewer) viewer=yes; shift ;;
      --no-viewer) viewer=no; shift ;;
      --nodes) nodes=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --replicas) replicas=$2; shift 2 ;;
      --quorum) quorum=$2; shift 2 ;;
      --sites) sites=$2; shift 2 ;;
      --down-to-out) down_to_out=$2; shift 2 ;;
      --repair-rate) rate=$2; shift 2 ;;
      --move-dest) dests+=("$2"); shift 2 ;;
      --tls) tls=1; shift ;;
      --tls-port) tls_port=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ && $nodes -ge 1 ]] || die "--nodes must be a positive number"
  (( quorum <= replicas )) || quorum=$replicas
  local -a site_of=()
  if [[ -n $sites ]]; then
    IFS=, read -r -a site_of <<<"$sites"
    [[ ${#site_of[@]} -eq $nodes ]] || die "--sites names ${#site_of[@]} sites for $nodes nodes"
  fi
  if running "$dir/router.pid"; then
    die "a cluster is already running in $dir (local-cluster.sh down $dir first)"
  fi
  build_all
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  cat >"$dir/cluster.env" <<ENV
PORT=$port
REPLICAS=$replicas
QUORUM=$quorum
PROBE_INTERVAL=500ms
PROBE_TIMEOUT=200ms
SYNC_INTERVAL=5s
DOWN_TO_OUT=$down_to_out
REPAIR_INTERVAL=2s
REPAIR_RATE=$rate
SCRUB_INTERVAL=60s
TLS=$tls
TLS_PORT=$tls_port
HTTP_PORT=$http_port
ENV
  ((tls)) && make_tls_files "$dir"

  # HTTP users (admin; viewer, whose credentials the demo viewer page sends),
  # the token key, and the viewer's site.
  if [[ $http_port != 0 && ! -f "$dir/users" ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$dir/http.password")
    SHARDPACS_PASSWORD=$(cat "$dir/http.password") \
      "$bin/shardpacs-router" user add "$dir/users" admin >/dev/null
  fi
  if [[ $http_port != 0 && -f "$dir/users" ]] && ! grep -q '^viewer:' "$dir/users"; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$dir/viewer.password")
    SHARDPACS_PASSWORD=$(cat "$dir/viewer.password") \
      "$bin/shardpacs-router" user add "$dir/users" viewer >/dev/null
  fi
  [[ $http_port == 0 || -f "$dir/token.key" ]] || "$bin/shardpacs-router" token-key "$dir/token.key" >/dev/null
  if [[ $http_port != 0 && ( $viewer == yes || ( $viewer == auto && -n $(command -v npm) ) ) ]]; then
    if "$root/deploy/viewer.sh" "$dir/viewer" --cache "$dir/viewer-npm" \
      --basic viewer "$dir/viewer.password"; then
      viewer_dir=$dir/viewer
    elif [[ $viewer == yes ]]; then
      die "installing the viewer failed (deploy/viewer.sh)"
    else
      echo "local-cluster: warning: the OHIF Viewer could not be installed; DICOMweb only (--no-viewer skips it)" >&2
    fi
  fi

  # Keys: one pair per member plus an operator key; all listed in cluster.keys,
  # each with its role (node, router, admin: what it may ask of a node).
  : >"$dir/cluster.keys.new"
  for i in $(seq 1 "$nodes"); do
    mkdir -p "$dir/n$i"
    [[ -f "$dir/n$i/node.key" ]] || "$bin/shardpacs" keygen "$dir/n$i/node.key" "$dir/n$i/node.pub" >/dev/null
    echo "$(pubkey "$dir/n$i/node.key") n$i node" >>"$dir/cluster.keys.new"
  done
  for who in router admin; do
    [[ -f "$dir/$who.key" ]] || "$bin/shardpacs" keygen "$dir/$who.key" >/dev/null
    echo "$(pubkey "$dir/$who.key") $who $who" >>"$dir/cluster.keys.new"
  done
  mv "$dir/cluster.keys.new" "$dir/cluster.keys"

  # Storage nodes on free loopback ports (each reports the port it got and
  # keeps it for restarts). n1 starts first; the others join its gossip
  # through it as their seed. Afterwards every node lists all others as its
  # seeds, for its next start.
  local seeds=""
  for i in $(seq 1 "$nodes"); do
    write_node_conf "$dir" "$i" "${site_of[$((i - 1))]:-}" "$seeds"
    start_node "$dir/n$i" "n$i"
    pin_listen "$dir/n$i"
    [[ $i -eq 1 ]] && seeds="n1@$(cat "$dir/n1/ready")"
  done
  for i in $(seq 1 "$nodes"); do set_seeds "$dir" "n$i"; done

  # The router: a gossip member seeded with every node.
  # shellcheck disable=SC1091
  source "$dir/cluster.env"
  {
    echo "[router]"
    echo "id = router"
    echo "listen = tcp://127.0.0.1:*"
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
CONF
    local all=""
    for i in $(seq 1 "$nodes"); do all+="${all:+,}n$i@$(cat "$dir/n$i/ready")"; done
    echo "seeds = $all"
    gossip_conf
    echo "[admin]"
    echo "listen = 127.0.0.1:$(admin_port "$dir/router.admin.port")"
    if ((tls)); then
      cat <<CONF
[tls]
enabled = true
port = $tls_port
certificate = tls/server.pem
key = tls/server.key
ca = tls/ca.pem
verify_peer = true
CONF
    fi
    if [[ $http_port != 0 ]]; then
      cat <<CONF
[http]
port = $http_port
bind = 127.0.0.1
users = users
token_key = token.key
viewer_dir = $viewer_dir
CONF
    fi
    echo "[destinations]"
    for d in "${dests[@]+"${dests[@]}"}"; do
      echo "${d%%=*} = ${d#*=}"
    done
  } >"$dir/router.conf"

  nohup "$bin/shardpacs-router" --config "$dir/router.conf" >>"$dir/router.log" 2>&1 &
  echo $! >"$dir/router.pid"
  local echoed=0
  for _ in $(seq 1 250); do
    if echoscu -to 2 -aec SHARDPACS 127.0.0.1 "$port" >/dev/null 2>&1; then
      echoed=1
      break
    fi
    running "$dir/router.pid" || die "router exited; see $dir/router.log"
    sleep 0.04
  done
  ((echoed)) || die "router does not answer C-ECHO on port $port; see $dir/router.log"
  local tlsargs=(+tls "$dir/tls/client.key" "$dir/tls/client.pem" +cf "$dir/tls/ca.pem")
  if ((tls)); then
    echoscu -to 5 -aec SHARDPACS "${tlsargs[@]}" 127.0.0.1 "$tls_port" >/dev/null 2>&1 ||
      die "router does not answer C-ECHO over TLS on port $tls_port; see $dir/router.log"
  fi

  # Every node alive (a node announces itself alive after its first repair
  # round) and, with a gossiping router, the router seen too.
  if cluster_status "$dir" --json >/dev/null; then
    local want="all(m.get(f'n{i}', {}).get('state') == 'alive' for i in range(1, $nodes + 1))"
    want+=" and m.get('router', {}).get('state') == 'alive'"
    wait_status "$dir" "$want" 60 ||
      die "not every member became alive within 60 s; see $dir/n*/node.log, $dir/router.log and '$0 status $dir'"
  else
    echo "local-cluster: warning: no node answers 'shardpacs status'; not waiting for membership" >&2
  fi
  cat <<EOT
ShardPACS is up: $nodes storage nodes, router AE SHARDPACS on 127.0.0.1:$port (N=$replicas, W=$quorum).
Files, keys and logs: $dir
  Send:      storescu -aec SHARDPACS 127.0.0.1 $port FILE.dcm ...
  Find:      findscu -S -aec SHARDPACS -k QueryRetrieveLevel=STUDY -k PatientName='*' -k StudyInstanceUID 127.0.0.1 $port
  Retrieve:  getscu -aec SHARDPACS -k QueryRetrieveLevel=STUDY -k StudyInstanceUID=UID -od OUTDIR 127.0.0.1 $port
  (set TCP_NODELAY=1 in the environment of DCMTK tools, or each exchange waits on Nagle)
  Status:    $0 status $dir [--json]      Stop: $0 down $dir
EOT
  if ((tls)); then
    cat <<EOT
DICOM TLS on 127.0.0.1:$tls_port (TLS 1.2+, client certificates signed by $dir/tls/ca.pem required):
  Send:      storescu -aec SHARDPACS ${tlsargs[*]} 127.0.0.1 $tls_port FILE.dcm ...
  Echo/Find: echoscu|findscu -aec SHARDPACS ${tlsargs[*]} ... 127.0.0.1 $tls_port
EOT
  fi
  cat <<EOT
  Faults:    $0 kill-node|restart-node|drain $dir nK;  grow: $0 add-node $dir [--site S]
  Admin CLI: $bin/shardpacs status --connect $(cat "$dir/n1/ready") --server-key $dir/n1/node.pub --key $dir/admin.key
  A dead node is out (re-replicated) $DOWN_TO_OUT after it went down.
EOT
  if [[ $http_port != 0 ]]; then
    cat <<EOT
  DICOMweb:  curl -u admin:\$(cat $dir/http.password) http://127.0.0.1:$http_port/dicom-web/studies
EOT
    [[ -z $viewer_dir ]] || echo "  Viewer:    http://127.0.0.1:$http_port/viewer/   (OHIF; study list, then double-click a study)"
  fi
}

stop_pidfile() {
  local f=$1
  [[ -f "$f" ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -CONT "$pid" 2>/dev/null || true # a SIGSTOPped process cannot act on TERM
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
  local dir=$1 json=0
  [[ -d "$dir" ]] || die "no cluster in $dir"
  [[ ${2:-} == --json ]] && json=1
  if ((json)); then
    local out
    out=$(cluster_status "$dir" --json) || die "no node of $dir answers"
    # The DICOM side, which the nodes do not know: ports and TLS files.
    local PORT=11112 TLS=0 TLS_PORT=2762 HTTP_PORT=8042
    # shellcheck disable=SC1091
    [[ -f $dir/cluster.env ]] && source "$dir/cluster.env"
    "$PY" -c '
import json, os, re, sys
s = json.loads(sys.stdin.read())
d, tls, port, tls_port = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
http_port = int(sys.argv[5])
s["dicom"] = {"ae_title": "SHARDPACS", "host": "127.0.0.1", "port": port}
# The admin port (metrics and health) of every process, as written at up.
import os
procs = []
for name in ["router"] + sorted(n for n in os.listdir(d) if os.path.isfile(f"{d}/{n}/node.conf")):
    pf = f"{d}/router.admin.port" if name == "router" else f"{d}/{name}/admin.port"
    if not os.path.isfile(pf):
        continue
    base = f"http://127.0.0.1:{open(pf).read().strip()}"
    procs.append({"name": name, "kind": "router" if name == "router" else "node",
                  "metrics": f"{base}/metrics", "healthz": f"{base}/healthz",
                  "readyz": f"{base}/readyz"})
s["processes"] = procs
if tls:
    s["dicom"]["tls"] = {"port": tls_port, "ca": f"{d}/tls/ca.pem",
                         "client_certificate": f"{d}/tls/client.pem",
                         "client_key": f"{d}/tls/client.key", "verify_peer": True}
def read(name):
    try:
        with open(os.path.join(d, name)) as f:
            return f.read().strip()
    except OSError:
        return None
conf = read("router.conf") or ""
if http_port and re.search(r"^\[http\]", conf, re.M):
    cert = re.search(r"^tls_cert *= *(\S+)", conf, re.M)
    scheme = "https" if cert else "http"
    origin = f"{scheme}://127.0.0.1:{http_port}"
    viewer = re.search(r"^viewer_dir *= *(\S+)", conf, re.M)
    users = [{"user": u, "password": read(f"{f}.password")}
             for u, f in (("admin", "http"), ("viewer", "viewer")) if read(f"{f}.password")]
    s["http"] = {"port": http_port, "dicomweb": f"{origin}/dicom-web",
                 "viewer": f"{origin}/viewer/" if viewer else None,
                 "ca": None, "users": users}
print(json.dumps(s, indent=2))' "$(cd "$dir" && pwd)" "$TLS" "$PORT" "$TLS_PORT" "$HTTP_PORT" <<<"$out"
    return 0
  fi
  if running "$dir/router.pid"; then
    echo "router   running (pid $(cat "$dir/router.pid"))"
  else
    echo "router   stopped"
  fi
  local name
  for name in $(node_names "$dir"); do
    if running "$dir/$name/node.pid"; then
      printf '%-8s running (pid %s) %s\n' "$name" "$(cat "$dir/$name/node.pid")" \
        "$(cat "$dir/$name/ready" 2>/dev/null)"
    else
      printf '%-8s stopped\n' "$name"
    fi
  done
  echo
  cluster_status "$dir" || die "no node of $dir answers"
}

# The folder of node $2 of cluster $1, which must exist.
node_dir() {
  [[ $2 =~ ^n[0-9]+$ && -f $1/$2/node.conf ]] || die "no node $2 in $1"
  echo "$1/$2"
}

cmd_add_node() {
  local dir=$1; shift
  local site=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --site) site=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ -f $dir/cluster.env ]] || die "no cluster in $dir (local-cluster.sh up $dir first)"
  dir=$(cd "$dir" && pwd)
  local k=1 name
  for name in $(node_names "$dir"); do (( ${name#n} >= k )) && k=$(( ${name#n} + 1 )); done
  name=n$k
  mkdir -p "$dir/$name"
  "$bin/shardpacs" keygen "$dir/$name/node.key" "$dir/$name/node.pub" >/dev/null
  # Append through a new file renamed into place: a member re-reading the
  # key file never sees half a line.
  cp "$dir/cluster.keys" "$dir/cluster.keys.new"
  echo "$(pubkey "$dir/$name/node.key") $name node" >>"$dir/cluster.keys.new"
  mv "$dir/cluster.keys.new" "$dir/cluster.keys"
  write_node_conf "$dir" "$k" "$site" ""
  set_seeds "$dir" "$name"
  # Running members re-read cluster.keys within a second; until then they
  # refuse the new key, and the new node's first contacts would be lost.
  sleep 1.2
  start_node "$dir/$name" "$name"
  pin_listen "$dir/$name"
  wait_status "$dir" "'$name' in m and m['$name']['state'] in ('joining', 'alive')" 30 ||
    die "the cluster does not see $name within 30 s; see $dir/$name/node.log"
  echo "$name started ($(cat "$dir/$name/ready")${site:+, site $site}); it joins, takes over its partitions and then announces itself alive"
}

cmd_kill_node() {
  local dir=$1 n; n=$(node_dir "$1" "$2")
  running "$n/node.pid" || die "$2 is not running"
  kill -KILL "$(cat "$n/node.pid")"
  echo "killed $2 (kill -9)"
}

cmd_restart_node() {
  local dir=$1 n; n=$(node_dir "$1" "$2")
  stop_pidfile "$n/node.pid"
  start_node "$n" "$2"
  echo "$2 restarted on $(cat "$n/ready")"
}

cmd_drain() {
  local dir=$1 n m; n=$(node_dir "$1" "$2")
  for m in $(node_names "$dir"); do
    [[ $m == "$2" ]] && continue
    running "$dir/$m/node.pid" || continue
    exec "$bin/shardpacs" drain --connect "$(cat "$dir/$m/ready")" \
      --server-key "$dir/$m/node.pub" --key "$dir/admin.key" "$2"
  done
  die "no other running node to ask"
}

[[ $# -ge 2 ]] || usage
cmd=$1
shift
case $cmd in
  up) cmd_up "$@" ;;
  down) cmd_down "$1" ;;
  status) cmd_status "$@" ;;
  add-node) cmd_add_node "$@" ;;
  kill-node) [[ $# -eq 2 ]] || usage; cmd_kill_node "$@" ;;
  restart-node) [[ $# -eq 2 ]] || usage; cmd_restart_node "$@" ;;
  drain) [[ $# -eq 2 ]] || usage; cmd_drain "$@" ;;
  *) usage ;;
esac
