#!/usr/bin/env bash
# Ingest / query / retrieve benchmark: ShardPACS against existing archives,
# the anchors (DCMTK storescp as the protocol floor, Orthanc with its default
# SQLite index, DCMTK dcmqrscp), all driven in ONE run by the same
# DCMTK clients (storescu, findscu, getscu, movescu, echoscu) with the same
# generated data (tests/cluster/dataset.py: make_bulk_set).
#
#   tests/bench/ingest.sh [--small N] [--ct N] [--studies N] [--quick]
#                         [--find-studies N] [--find-runs N] [--repeat N]
#                         [--retrieve list|per-study] [--only LIST] [--keep]
#
#   --small N         small CT instances (64x64, ~10 KB files)    default 2000
#   --ct N            CT instances (512x512, ~526 KB files)        default 1000
#   --studies N       studies both sets are spread over            default 20
#   --find-studies N  extra 2-instance studies stored (untimed) into the
#                     queried archives before C-FIND, 0 for none   default 100
#   --find-runs N     findscu/echoscu processes per query and server
#                                                                  default 20
#   --repeat N        fresh-state runs per ingest cell and retrievals per
#                     server; the median is shown                  default 3
#   --retrieve MODE   list: one request with every CT study UID (default);
#                     per-study: one getscu/movescu process per study
#   --quick           smoke run: --small 200 --ct 100 --find-runs 5 --repeat 1
#   --only LIST       comma list of shardpacs (3 nodes, N=3), shardpacs1
#                     (1 node, N=1: one copy, the same work as Orthanc),
#                     storescp, orthanc, dcmqrscp (default all five)
#   --keep            keep the work folder (data, logs, server state)
#
# Prints Markdown tables (numbers only; it asserts nothing about speed) and a
# "LOST:" line for every run that did not deliver every SOP Instance UID of
# the data set. Exits non-zero only on real errors (a server does not start,
# the data set cannot be made). Progress goes to stderr.
#
# Method:
# - Every port is chosen free at run time (bind to port 0 on 127.0.0.1);
#   every client connects to 127.0.0.1 only. TCP_NODELAY=1 is exported, so
#   every DCMTK tool and server started here (and Orthanc's DCMTK) has it.
# - Clients: storescu -nh (try every file, count failures), findscu -S,
#   getscu -S +B, movescu -S, echoscu; all with calling AE BENCH.
# - Ingest: for every (server, set, associations) cell the server starts from
#   an EMPTY state (new storage folder, new process), because the same SOP
#   Instance UIDs are sent each time and a re-send would be a duplicate. With
#   4 associations the file list is split into 4 contiguous quarters, one
#   storescu process each, all started together. After a `sync`, the clock
#   runs from starting the first storescu to the exit of the last one
#   (process start included). Every run is then verified by SOP Instance
#   UID: storescp by reading the files it wrote, the others by an
#   IMAGE-level C-FIND per series (Orthanc also by REST /statistics;
#   the C-FIND responses go to a tmpfs scratch folder when /dev/shm is
#   one). Then the server is stopped cleanly (SIGTERM; ShardPACS:
#   local-cluster.sh down) and `sync` runs. The server that C-FIND and
#   retrieval use is then started again on the state its last CT run left
#   (Orthanc and dcmqrscp: same folders, new process; ShardPACS:
#   local-cluster.sh up on the same DIR, i.e. the same keys and node data,
#   new ports) and verified once more.
# - Server CPU per ingest run: utime + stime + cutime + cstime from
#   /proc/PID/stat, summed over the server's processes and all their
#   descendants, live or zombie (so storescp's and dcmqrscp's per-association
#   children count whether reaped or not), sampled just before the clock
#   starts and just after it stops. Shown as CPU seconds per GB (10^9 bytes
#   of data set files), the median of the runs; for ShardPACS also split
#   into the router and the nodes (sum of all nodes). The clients
#   (storescu) are NOT counted, nor server work still running when the last
#   storescu exits (e.g. RocksDB flushes and compactions). Clock-tick
#   resolution (10 ms per process) makes --quick numbers coarse.
# - Disk bytes per ingest run: sectors written (field 10 of
#   /proc/diskstats, x 512) of the block device that holds the work folder
#   (its partition's own row if it is one), from just before the clock
#   starts (after the `sync`) to after the verification, the server's
#   clean stop and a `sync`: the server's data, index, journal and log
#   writes, with the file system's own overhead. The counter is the
#   device's: anything else writing to that disk meanwhile counts too (run
#   it on a quiet machine; the first output line gives the rate others
#   wrote at during 2 idle seconds before the run). Shown per byte of data
#   set files ingested and, divided by the copies kept (ShardPACS N; the
#   anchors keep one), per byte stored. ShardPACS nodes that do not flush
#   their RocksDB memtables at a clean stop leave what was still in them
#   counted once (WAL) instead of twice (WAL, then SST or blob file). Not
#   measured (shown as —) when the work folder is on no block device
#   (tmpfs, overlayfs).
# - storescp (floor): storescp --fork +B -dhl -od DIR: one process per
#   association (so 4 associations really run in parallel), bit-preserving
#   (writes the received data set bytes to a file without parsing or
#   re-encoding them, like a bit-exact archive), no index, no fsync.
# - Orthanc: /usr/sbin/Orthanc CONFIG with its own JSON config (Debian
#   defaults otherwise: SQLite index, SyncStorageArea true,
#   StorageAccessOnFind Always, SynchronousCMove true), no plugins; the
#   Debian service is not used.
# - dcmqrscp: ingested with ONE association only (concurrent stores lose
#   instances: two stores can land in one file name); its CT ingest is
#   shown for reference.
# - ShardPACS: deploy/local-cluster.sh up DIR --nodes 3 --port P
#   --replicas 3 --quorum 2 --http-port H --move-dest
#   BENCHDEST=127.0.0.1:PORT (P and H free ports, DICOMweb unused but on as
#   by default); skipped with a note when that script is missing.
#   shardpacs1 (the "N=1" rows): the same with --nodes 1 --replicas 1
#   --quorum 1, one copy of every instance like the anchors; ingest only
#   (C-FIND and retrieval use the N=3 cluster). ShardPACS runs last, N=1
#   before N=3, so a cluster's background work never overlaps another
#   server's ingest.
# - C-FIND: the archives left populated by the last CT ingest run
#   (restarted after it, see Ingest) plus --find-studies extra studies, all
#   running at once; study-level queries (Study Root), one findscu process
#   per query, interleaved run by run across queries and servers, median
#   ms. echoscu (process start + association + C-ECHO) is the baseline.
# - Retrieval: the whole CT set. Default: ONE association and ONE
#   STUDY-level request whose Study Instance UID is the list of all CT
#   studies. --retrieve per-study:
#   one getscu/movescu process per study. (getscu 3.6.7 crashes after the
#   last of several query files, so the one-association-many-requests form
#   is not used.) C-GET lands in getscu +B (files), C-MOVE in a storescp
#   with the floor's flags. Every retrieval is verified by SOP Instance UID.
set -euo pipefail
export LC_ALL=C
export TCP_NODELAY=1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cluster_sh=$root/deploy/local-cluster.sh
PY=/usr/bin/python3

n_small=2000 n_ct=1000 n_studies=20 n_find=100 repeat=3 find_runs=20 keep=0
retrieve_mode=list
only=shardpacs,shardpacs1,storescp,orthanc,dcmqrscp

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
need_num() { [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "ingest.sh: $1 needs a number" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --small) need_num "$1" "${2:-}"; n_small=$2; shift 2 ;;
    --ct) need_num "$1" "${2:-}"; n_ct=$2; shift 2 ;;
    --studies) need_num "$1" "${2:-}"; n_studies=$2; shift 2 ;;
    --find-studies) need_num "$1" "${2:-}"; n_find=$2; shift 2 ;;
    --retrieve) retrieve_mode=${2:-}; shift 2
      [[ $retrieve_mode == list || $retrieve_mode == per-study ]] ||
        { echo "ingest.sh: --retrieve is list or per-study" >&2; exit 2; } ;;
    --repeat) need_num "$1" "${2:-}"; repeat=$2; shift 2 ;;
    --find-runs) need_num "$1" "${2:-}"; find_runs=$2; shift 2 ;;
    --quick) n_small=200; n_ct=100; find_runs=5; repeat=1; shift ;;
    --only) only=${2:?--only needs a list}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ingest.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
((n_small > 0 && n_ct > 0 && n_studies > 0 && repeat > 0 && find_runs > 0)) ||
  { echo "ingest.sh: counts must be positive" >&2; exit 2; }

want() { [[ ,$only, == *,$1,* ]]; }
for name in ${only//,/ }; do
  [[ $name =~ ^(shardpacs|shardpacs1|storescp|orthanc|dcmqrscp)$ ]] ||
    { echo "ingest.sh: --only: unknown server $name (try --help)" >&2; exit 2; }
done
say() { printf 'bench [%3ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'bench: ERROR: %s\n' "$*" >&2; exit 1; }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

for tool in storescu findscu getscu movescu echoscu storescp dcmqrscp curl; do
  command -v "$tool" >/dev/null || die "$tool not found (install dcmtk, curl)"
done
[[ -x $PY ]] || die "$PY not found"
if want orthanc && [[ ! -x /usr/sbin/Orthanc ]]; then
  die "/usr/sbin/Orthanc not found (apt-get install orthanc, or leave it out with --only)"
fi

# ---------------------------------------------------------------------------
# Python helper: free ports, data set preparation (through dataset.py),
# verification by SOP Instance UID, tables.
read -r -d '' PYHELPER <<'PYEOF' || true
import os, socket, statistics, sys

def ports(n):
    socks = []
    for _ in range(int(n)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))

def _query(path, level, **keys):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    ds.save_as(path, write_like_original=True)

def _write(path, lines):
    with open(path, "w") as f:
        f.write("".join(str(x) + "\n" for x in lines))

def prepare(root, out, n_small, n_ct, n_studies, n_find):
    sys.path.insert(0, os.path.join(root, "tests", "cluster"))
    import dataset
    import pydicom
    bulk = dataset.make_bulk_set(os.path.join(out, "data"), small=int(n_small),
                                 ct=int(n_ct), studies=int(n_studies))
    kinds = {"small": bulk.small_paths, "ct": bulk.ct_paths}
    if int(n_find) > 0:
        # Extra studies for C-FIND only (other seed, so other UIDs and IDs):
        # 2 small instances each, stored once into every queried archive.
        extra = dataset.make_bulk_set(os.path.join(out, "data-find"), small=2 * int(n_find),
                                      ct=0, studies=int(n_find), seed=1)
        kinds["find"] = extra.small_paths
    meta, all_studies = [], {}
    os.makedirs(os.path.join(out, "q"), exist_ok=True)
    for kind, paths in kinds.items():
        paths = [str(p) for p in paths]
        rows, nbytes = [], 0
        for p in paths:
            rows.append(pydicom.dcmread(p, stop_before_pixels=True))
            nbytes += os.path.getsize(p)
        _write(os.path.join(out, f"{kind}.lst"), paths)
        q = len(paths) // 4
        for i in range(4):   # 4 contiguous quarters, one per association
            _write(os.path.join(out, f"{kind}.p{i + 1}.lst"), paths[i * q:(i + 1) * q] if i < 3 else paths[3 * q:])
        uids = sorted(str(ds.SOPInstanceUID) for ds in rows)
        if len(set(uids)) != len(uids):
            raise SystemExit(f"{kind}: duplicate SOP Instance UIDs in the data set")
        _write(os.path.join(out, f"{kind}.uids"), uids)
        series = sorted({(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in rows})
        vdir = os.path.join(out, "q", f"verify-{kind}")
        os.makedirs(vdir, exist_ok=True)
        for i, (st, se) in enumerate(series):
            _query(os.path.join(vdir, f"{i:05d}.dcm"), "IMAGE", StudyInstanceUID=st,
                   SeriesInstanceUID=se, SOPInstanceUID="")
        studies = {}
        for ds in rows:
            studies.setdefault(str(ds.StudyInstanceUID), ds)
        meta += [f"{kind}_n={len(paths)}", f"{kind}_bytes={nbytes}",
                 f"{kind}_studies={len(studies)}", f"{kind}_series={len(series)}"]
        if kind in ("ct", "find"):
            all_studies.update(studies)
        if kind == "ct":
            uids = sorted(studies)
            _query(os.path.join(out, "q", "retrieve-all.dcm"), "STUDY", StudyInstanceUID=uids)
            rdir = os.path.join(out, "q", "retrieve")
            os.makedirs(rdir, exist_ok=True)
            for i, st in enumerate(uids):
                _query(os.path.join(rdir, f"{i:05d}.dcm"), "STUDY", StudyInstanceUID=st)
    meta.append(f"find_total_studies={len(all_studies)}")
    find_queries(out, [all_studies[k] for k in sorted(all_studies)])
    _write(os.path.join(out, "meta.sh"), meta)

def find_queries(out, studies):
    """Study-level queries on the CT set, each with its expected count."""
    g = lambda ds, k: str(getattr(ds, k, "") or "")
    n = len(studies)
    mid = studies[n // 2]
    ret = dict(PatientName="", PatientID="", StudyDate="", StudyTime="",
               AccessionNumber="", StudyID="", StudyInstanceUID="")
    qs = []
    qs.append(("StudyInstanceUID exact", {"StudyInstanceUID": g(mid, "StudyInstanceUID")}))
    qs.append(("PatientID exact", {"PatientID": g(mid, "PatientID")}))
    name = g(mid, "PatientName")
    names = [g(s, "PatientName") for s in studies]
    prefix = name
    for length in range(1, len(name)):
        if sum(x.startswith(name[:length]) for x in names) <= max(1, n // 4):
            prefix = name[:length]
            break
    else:
        prefix = name[:-1]
    qs.append((f"PatientName prefix ({prefix}*)", {"PatientName": prefix + "*"}))
    dates = sorted(g(s, "StudyDate") for s in studies)
    lo, hi = dates[n // 4], dates[max(n // 4, n // 2 - 1)]
    qs.append((f"StudyDate range ({lo}-{hi})", {"StudyDate": f"{lo}-{hi}"}))
    qs.append(("AccessionNumber exact", {"AccessionNumber": g(mid, "AccessionNumber")}))
    qs.append(("all studies (universal)", {}))
    def expect(keys):
        c = 0
        for s in studies:
            ok = True
            for k, v in keys.items():
                val = g(s, k)
                if k == "PatientName": ok &= val.startswith(v[:-1])
                elif k == "StudyDate":
                    a, b = v.split("-"); ok &= a <= val <= b
                else: ok &= val == v
            c += ok
        return c
    fdir = os.path.join(out, "q", "find")
    os.makedirs(fdir, exist_ok=True)
    with open(os.path.join(out, "q", "find.tsv"), "w") as f:
        for i, (label, keys) in enumerate(qs):
            path = os.path.join(fdir, f"{i:02d}.dcm")
            _query(path, "STUDY", **dict(ret, **keys))
            f.write(f"{path}\t{label}\t{expect(keys)}\n")

def verify(d, uidfile):
    """Prints 'received expected missing unexpected' for the files under d."""
    import pydicom
    want = set(open(uidfile).read().split())
    got, bad = set(), 0
    for base, _, files in os.walk(d):
        for fn in files:
            try:
                ds = pydicom.dcmread(os.path.join(base, fn), force=True,
                                     stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                got.add(str(ds.SOPInstanceUID))
            except Exception:
                bad += 1
    print(len(got & want), len(want), len(want - got), len(got - want) + bad)

def _med(xs):
    return statistics.median(xs) if xs else None

def _read(results):
    rows = []
    for line in open(results):
        rows.append(line.rstrip("\n").split("\t"))
    return rows

NAMES = {"shardpacs": "ShardPACS", "shardpacs1": "ShardPACS N=1", "storescp": "storescp",
         "orthanc": "Orthanc", "dcmqrscp": "dcmqrscp"}
# Rows of the ingest table, in order, with their labels there.
INGEST_ROWS = (("shardpacs", "ShardPACS N=3"), ("shardpacs1", "ShardPACS N=1"),
               ("storescp", "storescp (floor)"), ("orthanc", "Orthanc"), ("dcmqrscp", "dcmqrscp"))

def _rate(n, nbytes, us):
    s = us / 1e6
    return n / s, nbytes / s / 1048576

def _cell(v):
    if v is None: return "—"
    return f"{v[0]:,.0f} ({v[1]:,.0f})"

def _ratio(a, b):
    return f"{a[0] / b[0]:.2f}" if a and b and b[0] > 0 else "—"

def table_ingest(results, metafile):
    meta = dict(l.split("=", 1) for l in open(metafile).read().split())
    hz = int(meta["clk_tck"])
    cells, cpu, disk = {}, {}, {}
    for r in _read(results):
        if r[0] == "ingest":
            _, srv, kind, conc, us, ok = r
            cells.setdefault((srv, kind, conc), []).append(int(us))
        elif r[0] == "cpu":   # one row per run and process kind
            _, srv, kind, conc, rep, part, ticks = r
            cpu.setdefault((srv, kind, conc), {}).setdefault(rep, {})[part] = int(ticks)
        elif r[0] == "disk":  # one row per run
            _, srv, kind, conc, rep, nbytes, copies = r
            disk.setdefault((srv, kind, conc), []).append((int(nbytes), int(copies)))
    def get(srv, kind, conc):
        xs = cells.get((srv, kind, conc))
        if not xs: return None
        return _rate(int(meta[f"{kind}_n"]), int(meta[f"{kind}_bytes"]), _med(xs))
    def cpu_gb(srv, kind, conc, part=None):
        """Median over runs of the server's CPU seconds per GB (1e9 bytes)
        of the data set: one process kind, or all of them (None)."""
        runs = cpu.get((srv, kind, conc), {}).values()
        xs = [sum(d.values()) if part is None else d[part] for d in runs if part is None or part in d]
        gb = int(meta[f"{kind}_bytes"]) / 1e9
        return (_med([x / hz / gb for x in xs]),) if xs else None
    def cpu_cell(v):
        return "—" if v is None else f"{v[0]:,.1f}"
    def disk_bb(srv, kind, conc, per_copy=False):
        """Median over runs of the disk bytes written per byte of the data
        set, or per byte stored (divided by the number of copies)."""
        xs = [w / (c if per_copy else 1) / int(meta[f"{kind}_bytes"])
              for w, c in disk.get((srv, kind, conc), [])]
        return (_med(xs),) if xs else None
    def disk_cell(v):
        return "—" if v is None else f"{v[0]:.2f}"
    dev = meta.get("disk_name") or None
    print("### Ingest (C-STORE, storescu): instances/s (MiB/s), server CPU seconds per GB ingested, "
          f"bytes written to {dev or 'the disk (not found: not measured)'} per byte ingested "
          "and per byte stored (÷ copies); ratios are this ÷ Orthanc\n")
    print("| data | assoc. | server | instances/s (MiB/s) | ÷ Orthanc | CPU-s/GB | ÷ Orthanc "
          "| disk B/B | ÷ Orthanc | disk B/B per copy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("small", "ct"):
        n, b = int(meta[f"{kind}_n"]), int(meta[f"{kind}_bytes"])
        label = f"{kind} ({n:,} × {b / n / 1024:,.0f} KiB)"
        for conc in ("1", "4"):
            orr, orr_cpu = get("orthanc", kind, conc), cpu_gb("orthanc", kind, conc)
            orr_disk = disk_bb("orthanc", kind, conc)
            for srv, name in INGEST_ROWS:
                v = get(srv, kind, conc)
                if v is None: continue
                c, d = cpu_gb(srv, kind, conc), disk_bb(srv, kind, conc)
                print(f"| {label} | {conc} | {name} | {_cell(v)} | {_ratio(v, orr)} "
                      f"| {cpu_cell(c)} | {_ratio(c, orr_cpu)} "
                      f"| {disk_cell(d)} | {_ratio(d, orr_disk)} "
                      f"| {disk_cell(disk_bb(srv, kind, conc, True))} |")
    print()
    sp = [(srv, name) for srv, name in INGEST_ROWS
          if srv.startswith("shardpacs") and any(k[0] == srv for k in cpu)]
    if not sp: return
    print("### ShardPACS: CPU seconds per GB ingested, by process kind "
          "(each column its own median over runs)\n")
    print("| data | assoc. | cluster | router | nodes (sum of all) | total |")
    print("|---|---|---|---|---|---|")
    for kind in ("small", "ct"):
        for conc in ("1", "4"):
            for srv, name in sp:
                if (srv, kind, conc) not in cpu: continue
                print(f"| {kind} | {conc} | {name} | "
                      + " | ".join(cpu_cell(cpu_gb(srv, kind, conc, p)) for p in ("router", "nodes", None))
                      + " |")
    print()

def table_find(results, findtsv, metafile):
    meta = dict(l.split("=", 1) for l in open(metafile).read().split())
    labels = {}
    for line in open(findtsv):
        path, label, exp = line.rstrip("\n").split("\t")
        labels[path] = (label, exp)
    t, counts = {}, {}
    order = []
    for r in _read(results):
        if r[0] == "find":
            _, srv, q, us = r
            t.setdefault((srv, q), []).append(int(us) / 1000)
            if q not in order: order.append(q)
        elif r[0] == "findcount":
            _, srv, q, c = r
            counts[(srv, q)] = c
    servers = [s for s in ("shardpacs", "orthanc", "dcmqrscp") if any(k[0] == s for k in t)]
    print(f"### C-FIND on {meta['find_total_studies']} studies, study level (Study Root), "
          "one findscu process per query: median ms [matches]\n")
    print("| query | expected | " + " | ".join(NAMES[s] for s in servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for q in order:
        label, exp = labels.get(q, (q, "—"))
        cells = []
        for s in servers:
            m = _med(t.get((s, q), []))
            if m is None: cells.append("—"); continue
            c = counts.get((s, q))
            cells.append(f"{m:.1f}" + (f" [{c}]" if c is not None else ""))
        if q == "echo": label = "echoscu (baseline: process start, association, C-ECHO)"
        print(f"| {label} | {exp if q != 'echo' else '—'} | " + " | ".join(cells) + " |")
    finds = [q for q in order if q != "echo"]
    cells = []
    for s in servers:
        e = _med(t.get((s, "echo"), []))
        fm = [_med(t.get((s, q), [])) for q in finds]
        fm = [x for x in fm if x is not None]
        cells.append(f"{_med(fm) - e:.1f}" if e is not None and fm else "—")
    print("| median query − echoscu (server's own work) | — | " + " | ".join(cells) + " |")
    print()
    bad = [(s, q) for (s, q), c in counts.items() if q in labels and c != labels[q][1]]
    for s, q in bad:
        print(f"MISMATCH: {NAMES[s]} answered {counts[(s, q)]} matches to '{labels[q][0]}', expected {labels[q][1]}")
    if bad: print()

def table_retrieve(results, metafile, mode):
    meta = dict(l.split("=", 1) for l in open(metafile).read().split())
    cells = {}
    for r in _read(results):
        if r[0] != "retrieve": continue
        _, srv, op, us = r
        cells.setdefault((srv, op), []).append(int(us))
    n, b = int(meta["ct_n"]), int(meta["ct_bytes"])
    servers = [s for s in ("shardpacs", "orthanc", "dcmqrscp") if any(k[0] == s for k in cells)]
    how = ("one association, one STUDY-level request listing every study UID" if mode == "list"
           else "one process and association per study, in sequence")
    print(f"### Retrieval of the whole CT set ({n:,} instances, {meta['ct_studies']} studies; "
          f"{how}): instances/s (MiB/s)\n")
    print("| operation | " + " | ".join(NAMES[s] for s in servers) + " | ShardPACS/dcmqrscp | ShardPACS/Orthanc |")
    print("|---|" + "---|" * len(servers) + "---|---|")
    for op, label in (("get", "C-GET (getscu +B)"), ("move", "C-MOVE (movescu → storescp +B)")):
        v = {s: (_rate(n, b, _med(cells[(s, op)])) if (s, op) in cells else None) for s in servers}
        print(f"| {label} | " + " | ".join(_cell(v[s]) for s in servers)
              + f" | {_ratio(v.get('shardpacs'), v.get('dcmqrscp'))} | {_ratio(v.get('shardpacs'), v.get('orthanc'))} |")
    print()

def median_us():
    xs = [int(x) for x in sys.stdin.read().split()]
    print(int(_med(xs)))

cmd, args = sys.argv[1], sys.argv[2:]
{"ports": ports, "prepare": prepare, "verify": verify, "table-ingest": table_ingest,
 "table-find": table_find, "table-retrieve": table_retrieve}[cmd](*args)
PYEOF
py() { "$PY" -c "$PYHELPER" "$@"; }

# ---------------------------------------------------------------------------
# Work folder, process bookkeeping, cleanup.
work=$(mktemp -d "${TMPDIR:-/tmp}/spbench.XXXXXX")
# Scratch for the verification C-FINDs' response files: on tmpfs when there
# is one, so that they are not written to the measured disk.
if [[ -d /dev/shm && -w /dev/shm && $(stat -f -c %T /dev/shm) == tmpfs ]]; then
  scratch=$(mktemp -d /dev/shm/spbench.XXXXXX)
else
  scratch=$work
fi
results=$work/results.tsv
: >"$results"
declare -A PIDS=()          # name -> pid of every server started here
declare -A CLUSTERS=()      # dir -> 1 for every ShardPACS cluster that is up

stop_pid() {  # stop_pid PID: TERM, then KILL after 10 s; reaps it
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_server() {  # stop_server NAME
  local pid=${PIDS[$1]:-}
  [[ -n $pid ]] || return 0
  unset "PIDS[$1]"
  stop_pid "$pid"
}
cluster_down() {
  local dir=$1
  [[ -n ${CLUSTERS[$dir]:-} ]] || return 0
  unset "CLUSTERS[$dir]"
  "$cluster_sh" down "$dir" >>"$work/shardpacs.log" 2>&1 ||
    say "warning: local-cluster.sh down $dir failed (see $work/shardpacs.log)"
}
cleanup() {
  local rc=$? name dir
  set +e
  trap - EXIT INT TERM
  for dir in "${!CLUSTERS[@]}"; do cluster_down "$dir"; done
  for name in "${!PIDS[@]}"; do stop_server "$name"; done
  [[ $scratch == "$work" ]] || rm -rf "$scratch"
  if ((keep)); then say "work folder kept: $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { py ports 1; }

# wait_echo AE PORT PID [SECONDS]: until C-ECHO answers; fails if PID dies.
wait_echo() {
  local ae=$1 port=$2 pid=$3 secs=${4:-20} i
  for ((i = 0; i < secs * 20; i++)); do
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    echoscu -to 2 -ta 2 -aet BENCH -aec "$ae" 127.0.0.1 "$port" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  return 1
}

# --- storescp: the floor (files, no index, no fsync) -----------------------
# start_storescp NAME AE OUTDIR: sets PORT_<NAME> via the global SCP_PORT.
start_storescp() {
  local name=$1 ae=$2 out=$3 port
  mkdir -p "$out"
  for _ in 1 2 3; do
    port=$(free_port)
    storescp --fork +B -dhl -aet "$ae" -od "$out" "$port" >>"$work/$name.log" 2>&1 &
    PIDS[$name]=$!
    if wait_echo "$ae" "$port" "${PIDS[$name]}" 10; then SCP_PORT=$port; return 0; fi
    stop_server "$name"
  done
  tail -20 "$work/$name.log" >&2
  die "storescp ($name) did not start"
}

# --- Orthanc ----------------------------------------------------------------
ORTHANC_HTTP=
start_orthanc() {  # start_orthanc DIR -> SCP_PORT, ORTHANC_HTTP
  local dir=$1 port http
  mkdir -p "$dir/storage" "$dir/index"
  for _ in 1 2 3; do
    read -r port http < <(py ports 2)
    cat >"$dir/orthanc.json" <<EOF
{
  "Name" : "bench",
  "StorageDirectory" : "$dir/storage",
  "IndexDirectory" : "$dir/index",
  "StorageCompression" : false,
  "Plugins" : [ ],
  "HttpServerEnabled" : true,
  "HttpPort" : $http,
  "RemoteAccessAllowed" : false,
  "AuthenticationEnabled" : false,
  "DicomServerEnabled" : true,
  "DicomAet" : "ORTHANC",
  "DicomPort" : $port,
  "DicomCheckCalledAet" : false,
  "DicomModalities" : { "benchdest" : [ "BENCHDEST", "127.0.0.1", $DEST_PORT ] },
  "DicomAlwaysAllowEcho" : true,
  "DicomAlwaysAllowStore" : true,
  "DicomAlwaysAllowFind" : true,
  "DicomAlwaysAllowGet" : true,
  "DicomAlwaysAllowMove" : true
}
EOF
    TCP_NODELAY=1 /usr/sbin/Orthanc "$dir/orthanc.json" >>"$work/orthanc.log" 2>&1 &
    PIDS[orthanc]=$!
    if wait_echo ORTHANC "$port" "${PIDS[orthanc]}" 30 &&
       curl -sf "http://127.0.0.1:$http/system" >/dev/null; then
      SCP_PORT=$port ORTHANC_HTTP=$http
      return 0
    fi
    stop_server orthanc
  done
  tail -20 "$work/orthanc.log" >&2
  die "Orthanc did not start"
}

# --- dcmqrscp ---------------------------------------------------------------
start_dcmqrscp() {  # start_dcmqrscp DIR -> SCP_PORT
  local dir=$1 port
  mkdir -p "$dir/db"
  for _ in 1 2 3; do
    port=$(free_port)
    cat >"$dir/dcmqrscp.cfg" <<EOF
NetworkTCPPort  = $port
MaxPDUSize      = 16384
MaxAssociations = 16
HostTable BEGIN
benchdest = (BENCHDEST, 127.0.0.1, $DEST_PORT)
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
DCMQRSCP  $dir/db  RW  (10000, 4096mb)  ANY
AETable END
EOF
    dcmqrscp -c "$dir/dcmqrscp.cfg" -dhl >>"$work/dcmqrscp.log" 2>&1 &
    PIDS[dcmqrscp]=$!
    if wait_echo DCMQRSCP "$port" "${PIDS[dcmqrscp]}" 10; then SCP_PORT=$port; return 0; fi
    stop_server dcmqrscp
  done
  tail -20 "$work/dcmqrscp.log" >&2
  die "dcmqrscp did not start"
}

# --- ShardPACS ----------------------------------------------------------------
# sp_shape SERVER: "nodes replicas write-quorum" of a ShardPACS row.
sp_shape() {
  case $1 in
    shardpacs) echo "3 3 2" ;;
    shardpacs1) echo "1 1 1" ;;
    *) die "sp_shape: $1 is not a ShardPACS row" ;;
  esac
}

# sp_node_pids DIR: the pids of the cluster's nodes, comma-separated.
sp_node_pids() {
  local f pids=""
  for f in "$1"/n*/node.pid; do pids+=${pids:+,}$(cat "$f"); done
  echo "$pids"
}

# start_shardpacs DIR SERVER [restart] -> SCP_PORT: a new cluster in an
# empty DIR; with "restart", the stopped cluster of DIR again on its own
# state (keys, node data), by the same `local-cluster.sh up DIR` on new
# free ports (the nodes find each other again through gossip).
start_shardpacs() {
  local dir=$1 how=${3:-new} port http nodes replicas quorum
  read -r nodes replicas quorum < <(sp_shape "$2")
  for _ in 1 2 3; do
    read -r port http < <(py ports 2)
    [[ $how == restart ]] || rm -rf "$dir"
    if "$cluster_sh" up "$dir" --no-viewer --nodes "$nodes" --port "$port" \
         --replicas "$replicas" --quorum "$quorum" --http-port "$http" \
         --move-dest "BENCHDEST=127.0.0.1:$DEST_PORT" >>"$work/shardpacs.log" 2>&1; then
      CLUSTERS[$dir]=1
      if wait_echo SHARDPACS "$port" "" 10; then SCP_PORT=$port; return 0; fi
      cluster_down "$dir"
    else
      CLUSTERS[$dir]=1; cluster_down "$dir"
    fi
  done
  # Not fatal at once: the anchors' numbers are still printed, then exit 1.
  tail -30 "$work/shardpacs.log" >&2
  echo "ERROR: ShardPACS (deploy/local-cluster.sh up, $how) did not start; the rest of the run goes on without it"
  echo
  SP_FAILED=1 failed=1
}

# ---------------------------------------------------------------------------
# Measurements.

# The block device that holds the work folder (sets DISK_MAJ, DISK_MIN,
# DISK_NAME; all empty when there is none, e.g. on tmpfs or overlayfs): the
# file system's own device (a partition has its own /proc/diskstats row),
# else the block device df names as its source.
DISK_MAJ='' DISK_MIN='' DISK_NAME=''
find_disk() {
  local maj min src
  read -r maj min < <(stat -c '%Hd %Ld' "$work")
  if [[ ! -e /sys/dev/block/$maj:$min ]]; then
    src=$(df -P "$work" | awk 'NR == 2 { print $1 }')
    [[ -b $src ]] || return 0
    maj=$((16#$(stat -L -c %t "$src"))) min=$((16#$(stat -L -c %T "$src")))
    [[ -e /sys/dev/block/$maj:$min ]] || return 0
  fi
  DISK_MAJ=$maj DISK_MIN=$min
  DISK_NAME=$(basename "$(readlink -f "/sys/dev/block/$maj:$min")")
}

# disk_sectors: sectors (512 bytes) written to DISK_NAME since boot (field
# 10 of its /proc/diskstats row); empty without a disk.
disk_sectors() {
  [[ -n $DISK_NAME ]] || return 0
  awk -v M="$DISK_MAJ" -v m="$DISK_MIN" '$1 == M && $2 == m { print $10 }' /proc/diskstats
}

# disk_record SERVER KIND CONC REP COPIES: after the server's clean stop,
# a sync, then a disk record of the bytes written since ingest sampled
# DISK0 (before its clock started).
DISK0=
disk_record() {
  local now
  sync
  now=$(disk_sectors)
  [[ -n $now && -n $DISK0 ]] || return 0
  printf 'disk\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(((now - DISK0) * 512))" "$5" \
    >>"$results"
  DISK0=
}

# cpu_sample PART=PID[,PID...]...: prints "PART TICKS" for every PART, TICKS
# being utime + stime + cutime + cstime (clock ticks) summed over the PIDs
# and all their descendants, live or zombie, from one pass over /proc. A
# child's times move into its parent's cutime/cstime when it is reaped, so
# the sum does not change when a child exits between two samples (storescp
# --fork, dcmqrscp: one child per association).
cpu_sample() {
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v spec="$*" '
    {
      match($0, /.*\) /)   # the command name may hold spaces and parentheses
      split(substr($0, RLENGTH + 1), f, " ")
      par[$1] = f[2]; t[$1] = f[12] + f[13] + f[14] + f[15]
    }
    END {
      n = split(spec, parts, " ")
      for (i = 1; i <= n; i++) {
        split(parts[i], kv, "="); m = split(kv[2], roots, ",")
        split("", tree)
        for (j = 1; j <= m; j++) tree[roots[j]] = 1
        do {
          added = 0
          for (p in par) if (!(p in tree) && (par[p] in tree)) { tree[p] = 1; added = 1 }
        } while (added)
        sum = 0
        for (p in tree) if (p in t) sum += t[p]
        print kv[1], sum
      }
    }'
}

# ingest SERVER AE PORT KIND CONC [REP PART=PID,...]...: the timed ingest,
# appended to results; checks storescu logs. With REP, also the server's CPU
# ticks of every PART from just before the clock starts to just after it
# stops (cpu records), and DISK0 for disk_record.
ingest() {
  local srv=$1 ae=$2 port=$3 kind=$4 conc=$5 rep=${6:-} i t0 t1 rc=0 errs part ticks
  local -a pids=() files=() parts=("${@:7}")
  local -A cpu0=()
  local log=$work/storescu.$srv.$kind.$conc.log
  : >"$log"
  sync   # start every timed run with no dirty pages left by the previous one
  if ((${#parts[@]})); then
    DISK0=$(disk_sectors)
    while read -r part ticks; do cpu0[$part]=$ticks; done < <(cpu_sample "${parts[@]}")
  fi
  t0=$(now_us)
  if ((conc == 1)); then
    mapfile -t files <"$work/$kind.lst"
    storescu -nh -aet BENCH -aec "$ae" 127.0.0.1 "$port" "${files[@]}" >>"$log" 2>&1 || rc=$?
  else
    for ((i = 1; i <= conc; i++)); do
      mapfile -t files <"$work/$kind.p$i.lst"
      storescu -nh -aet BENCH -aec "$ae" 127.0.0.1 "$port" "${files[@]}" >>"$log" 2>&1 &
      pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=$?; done
  fi
  t1=$(now_us)
  if ((${#parts[@]})); then
    while read -r part ticks; do
      printf 'cpu\t%s\t%s\t%s\t%s\t%s\t%s\n' "$srv" "$kind" "$conc" "$rep" "$part" \
        "$((ticks - cpu0[$part]))" >>"$results"
    done < <(cpu_sample "${parts[@]}")
  fi
  errs=$(grep -c '^E:' "$log" || true)
  if ((rc != 0 || errs > 0)); then
    echo "STORESCU: ${srv} ${kind} x${conc}: exit status $rc, $errs error lines (first: $(grep -m1 '^E:' "$log" || true))"
  fi
  printf 'ingest\t%s\t%s\t%s\t%s\t%s\n' "$srv" "$kind" "$conc" "$((t1 - t0))" "$rc" >>"$results"
}

# report_verify WHAT "received expected missing unexpected"
report_verify() {
  local what=$1 got want missing extra
  read -r got want missing extra <<<"$2"
  if [[ -z $extra ]]; then
    echo "VERIFY: $what: could not be verified (the SOP Instance UID check failed)"
  elif ((missing > 0 || extra > 0)); then
    echo "LOST: $what: $got of $want SOP Instance UIDs received ($missing missing, $extra unexpected or unreadable)"
  fi
}

# verify_find SERVER AE PORT KIND WHAT: IMAGE-level C-FIND per series
verify_find() {
  local srv=$1 ae=$2 port=$3 kind=$4 what=$5 d=$scratch/vf
  rm -rf "$d"; mkdir -p "$d"
  findscu -S -X -od "$d" -aet BENCH -aec "$ae" 127.0.0.1 "$port" \
    "$work"/q/verify-"$kind"/*.dcm >>"$work/verify.log" 2>&1 ||
    echo "VERIFY: $what: findscu failed (exit $?), see the log with --keep"
  report_verify "$what" "$(py verify "$d" "$work/$kind.uids")"
  rm -rf "$d"
}

orthanc_count() {
  curl -sf "http://127.0.0.1:$ORTHANC_HTTP/statistics" |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])'
}

orthanc_verify_count() {  # orthanc_verify_count KIND WHAT
  local n
  n=$(orthanc_count || echo "?")
  [[ $n == "$(wc -l <"$work/$1.uids")" ]] ||
    echo "LOST: $2: Orthanc /statistics counts $n instances, expected $(wc -l <"$work/$1.uids")"
}

# One fresh-state ingest cell: start, ingest, verify, stop cleanly, sync,
# disk record. KEEP_RUNNING (the last run of the servers C-FIND and
# retrieval use): the server is started again on the state it left and
# verified once more.
run_ingest_cell() {  # SERVER KIND CONC REP KEEP_RUNNING
  local srv=$1 kind=$2 conc=$3 rep=$4 keep_up=$5 dir=$work/state/$1.$2.$3.$4 copies=1
  local what="$srv $kind x$conc (run $rep)" again="$srv $kind x$conc (run $rep, after a restart)"
  local nodes replicas quorum
  say "ingest: $what"
  case $srv in
    storescp)
      start_storescp storescp STORESCP "$dir"
      ingest storescp STORESCP "$SCP_PORT" "$kind" "$conc" "$rep" "server=${PIDS[storescp]}"
      report_verify "$what" "$(py verify "$dir" "$work/$kind.uids")"
      stop_server storescp
      disk_record "$srv" "$kind" "$conc" "$rep" "$copies" ;;
    orthanc)
      start_orthanc "$dir"
      ingest orthanc ORTHANC "$SCP_PORT" "$kind" "$conc" "$rep" "server=${PIDS[orthanc]}"
      verify_find orthanc ORTHANC "$SCP_PORT" "$kind" "$what"
      orthanc_verify_count "$kind" "$what"
      stop_server orthanc
      disk_record "$srv" "$kind" "$conc" "$rep" "$copies"
      if ((keep_up)); then
        start_orthanc "$dir"
        verify_find orthanc ORTHANC "$SCP_PORT" "$kind" "$again"
        orthanc_verify_count "$kind" "$again"
      fi ;;
    dcmqrscp)
      start_dcmqrscp "$dir"
      ingest dcmqrscp DCMQRSCP "$SCP_PORT" "$kind" "$conc" "$rep" "server=${PIDS[dcmqrscp]}"
      verify_find dcmqrscp DCMQRSCP "$SCP_PORT" "$kind" "$what"
      stop_server dcmqrscp
      disk_record "$srv" "$kind" "$conc" "$rep" "$copies"
      if ((keep_up)); then
        start_dcmqrscp "$dir"
        verify_find dcmqrscp DCMQRSCP "$SCP_PORT" "$kind" "$again"
      fi ;;
    shardpacs|shardpacs1)
      read -r nodes replicas quorum < <(sp_shape "$srv")
      copies=$replicas
      start_shardpacs "$dir" "$srv"
      ((SP_FAILED == 0)) || return 0
      ingest "$srv" SHARDPACS "$SCP_PORT" "$kind" "$conc" "$rep" \
        "router=$(cat "$dir/router.pid")" "nodes=$(sp_node_pids "$dir")"
      verify_find "$srv" SHARDPACS "$SCP_PORT" "$kind" "$what"
      cluster_down "$dir"
      disk_record "$srv" "$kind" "$conc" "$rep" "$copies"
      if ((keep_up)); then
        start_shardpacs "$dir" "$srv" restart
        ((SP_FAILED == 0)) || return 0
        verify_find "$srv" SHARDPACS "$SCP_PORT" "$kind" "$again"
      fi ;;
  esac
  ((keep_up)) || rm -rf "$dir"
  return 0
}

# ---------------------------------------------------------------------------
say "work folder $work; small=$n_small ct=$n_ct studies=$n_studies repeat=$repeat find-runs=$find_runs"

run_sp=0 SP_FAILED=0 failed=0
if want shardpacs || want shardpacs1; then
  if [[ -x $cluster_sh ]]; then run_sp=1
  else say "ShardPACS: skipped, deploy/local-cluster.sh is missing"; fi
fi

[[ -f $root/tests/cluster/dataset.py ]] || die "tests/cluster/dataset.py is missing"
say "making the data set with tests/cluster/dataset.py"
py prepare "$root" "$work" "$n_small" "$n_ct" "$n_studies" "$n_find" || die "the data set could not be made"
small_n=0 small_bytes=0 small_studies=0 ct_n=0 ct_bytes=0 ct_studies=0 find_studies=0
# shellcheck disable=SC1091
source "$work/meta.sh"   # the counts above, as the data set has them
echo "clk_tck=$(getconf CLK_TCK)" >>"$work/meta.sh"   # the unit of the cpu records
find_disk
echo "disk_name=$DISK_NAME" >>"$work/meta.sh"
cat "$work/small.lst" "$work/ct.lst" | xargs cat >/dev/null   # page cache warm for everyone
# The disk counter is the whole device's: what else writes to it while
# nothing of ours runs (2 s, after a sync) is printed beside the results.
disk_note="disk: not measured (the work folder is on no block device)"
if [[ -n $DISK_NAME ]]; then
  sync
  s0=$(disk_sectors); sleep 2; s1=$(disk_sectors)
  disk_note="disk: $DISK_NAME, written by others while idle before the run:"
  disk_note+=" $(((s1 - s0) * 512 / 2 / 1024)) KiB/s (counted in the disk columns too)"
fi
orthanc_version=$(/usr/sbin/Orthanc --version 2>/dev/null | sed -n '1s/.* //p' || true)
echo "ShardPACS ingest/query/retrieve benchmark, $(date -u +%Y-%m-%d), $(nproc) CPUs;" \
  "DCMTK $(storescu --version | sed -n '1s/.*storescu v\([^ ]*\).*/\1/p'), Orthanc ${orthanc_version:-not installed}." \
  "Data: small $small_n × $((small_bytes / small_n)) B, CT $ct_n × $((ct_bytes / ct_n)) B, $ct_studies studies;" \
  "median of $repeat fresh-state run(s) per cell; TCP_NODELAY=1 everywhere; $disk_note."
echo
if (want shardpacs || want shardpacs1) && ((!run_sp)); then
  echo "ShardPACS: skipped (deploy/local-cluster.sh is missing)."
  echo
fi
say "data: small $small_n instances ($small_bytes bytes, $small_studies studies), ct $ct_n instances ($ct_bytes bytes, $ct_studies studies)"

# The C-MOVE destination for every server: a storescp like the floor.
dest_dir=$work/dest
start_storescp dest BENCHDEST "$dest_dir"
DEST_PORT=$SCP_PORT

# Ingest. Servers that C-FIND and retrieval need stay up after their last
# (CT, 4 associations) run; ShardPACS goes last (N=1, then N=3, which C-FIND
# and retrieval use) so its background work never overlaps another server's
# ingest.
declare -A SRV_PORT=() SRV_AE=()
ingest_servers=()
want storescp && ingest_servers+=(storescp)
want orthanc && ingest_servers+=(orthanc)
((run_sp)) && want shardpacs1 && ingest_servers+=(shardpacs1)
((run_sp)) && want shardpacs && ingest_servers+=(shardpacs)
for srv in "${ingest_servers[@]}"; do
  for kind in small ct; do
    for conc in 1 4; do
      for ((rep = 1; rep <= repeat; rep++)); do
        [[ $srv == shardpacs* ]] && ((SP_FAILED)) && break 3
        last=0
        [[ ($srv == orthanc || $srv == shardpacs) && $kind == ct && $conc == 4 &&
           $rep == "$repeat" ]] && last=1
        run_ingest_cell "$srv" "$kind" "$conc" "$rep" "$last"
      done
    done
  done
  case $srv in
    orthanc) SRV_PORT[orthanc]=$SCP_PORT SRV_AE[orthanc]=ORTHANC ;;
    shardpacs) ((SP_FAILED)) || SRV_PORT[shardpacs]=$SCP_PORT SRV_AE[shardpacs]=SHARDPACS ;;
  esac
done
if want dcmqrscp; then   # one association only; kept up for C-FIND/retrieval
  run_ingest_cell dcmqrscp ct 1 1 1
  SRV_PORT[dcmqrscp]=$SCP_PORT SRV_AE[dcmqrscp]=DCMQRSCP
fi
echo
py table-ingest "$results" "$work/meta.sh"

qr_servers=()
for srv in shardpacs orthanc dcmqrscp; do [[ -n ${SRV_PORT[$srv]:-} ]] && qr_servers+=("$srv"); done
if ((${#qr_servers[@]} == 0)); then say "no query/retrieve server selected"; exit "$failed"; fi

# The extra C-FIND studies, stored once (one association, not timed) into
# every archive that C-FIND and retrieval use, then verified.
if [[ -f $work/find.lst ]]; then
  for srv in "${qr_servers[@]}"; do
    say "storing the $find_studies extra C-FIND studies into $srv"
    ingest "$srv-populate" "${SRV_AE[$srv]}" "${SRV_PORT[$srv]}" find 1
    verify_find "$srv" "${SRV_AE[$srv]}" "${SRV_PORT[$srv]}" find "$srv populate (C-FIND studies)"
  done
fi

# C-FIND latency: the count of every query once (findscu -X), then the timed
# runs, interleaved: run -> query -> server.
say "C-FIND: ${qr_servers[*]}, $find_runs runs per query"
mapfile -t fqueries < <(cut -f1 "$work/q/find.tsv")
for srv in "${qr_servers[@]}"; do
  for q in "${fqueries[@]}"; do
    d=$work/fc; rm -rf "$d"; mkdir -p "$d"
    findscu -S -X -od "$d" -aet BENCH -aec "${SRV_AE[$srv]}" 127.0.0.1 "${SRV_PORT[$srv]}" "$q" \
      >>"$work/find.log" 2>&1 || echo "FIND: $srv: findscu failed on $q (exit $?)"
    printf 'findcount\t%s\t%s\t%s\n' "$srv" "$q" "$(find "$d" -name 'rsp*' | wc -l)" >>"$results"
  done
done
rm -rf "$work/fc"
for ((r = 0; r < find_runs; r++)); do
  for q in echo "${fqueries[@]}"; do
    for srv in "${qr_servers[@]}"; do
      ae=${SRV_AE[$srv]} port=${SRV_PORT[$srv]}
      t0=$(now_us)
      if [[ $q == echo ]]; then
        echoscu -aet BENCH -aec "$ae" 127.0.0.1 "$port" >>"$work/find.log" 2>&1 ||
          echo "ECHO: $srv: echoscu failed (exit $?)"
      else
        findscu -S -sr -aet BENCH -aec "$ae" 127.0.0.1 "$port" "$q" >>"$work/find.log" 2>&1 ||
          echo "FIND: $srv: findscu failed (exit $?)"
      fi
      t1=$(now_us)
      printf 'find\t%s\t%s\t%s\n' "$srv" "$q" "$((t1 - t0))" >>"$results"
    done
  done
done
echo
py table-find "$results" "$work/q/find.tsv" "$work/meta.sh"

# Retrieval of the whole CT set: C-GET and C-MOVE, verified every time.
# list: one association, ONE STUDY-level request whose Study Instance UID is
# the list of every CT study (PS3.4 C.4.2.2.1 allows a UID list there);
# per-study: one getscu/movescu process per study, one after the other.
retrieve() {  # retrieve get|move AE PORT OUTDIR
  local op=$1 ae=$2 port=$3 out=$4 q rc=0
  local -a qs
  if [[ $retrieve_mode == list ]]; then qs=("$work/q/retrieve-all.dcm")
  else qs=("$work"/q/retrieve/*.dcm); fi
  for q in "${qs[@]}"; do
    if [[ $op == get ]]; then
      getscu -S +B -od "$out" -aet BENCH -aec "$ae" 127.0.0.1 "$port" "$q" \
        >>"$work/retrieve.log" 2>&1 || rc=$?
    else
      movescu -S -aet BENCH -aec "$ae" -aem BENCHDEST 127.0.0.1 "$port" "$q" \
        >>"$work/retrieve.log" 2>&1 || rc=$?
    fi
  done
  return "$rc"
}
say "retrieval ($retrieve_mode): ${qr_servers[*]}"
for ((rep = 1; rep <= repeat; rep++)); do
  for srv in "${qr_servers[@]}"; do
    ae=${SRV_AE[$srv]} port=${SRV_PORT[$srv]}
    d=$work/get; rm -rf "$d"; mkdir -p "$d"
    sync
    t0=$(now_us)
    retrieve get "$ae" "$port" "$d" || echo "GET: $srv: getscu exit status $?"
    t1=$(now_us)
    printf 'retrieve\t%s\tget\t%s\n' "$srv" "$((t1 - t0))" >>"$results"
    report_verify "$srv C-GET ct (run $rep)" "$(py verify "$d" "$work/ct.uids")"
    rm -rf "$d"
    find "$dest_dir" -mindepth 1 -delete
    sync
    t0=$(now_us)
    retrieve move "$ae" "$port" "" || echo "MOVE: $srv: movescu exit status $?"
    t1=$(now_us)
    printf 'retrieve\t%s\tmove\t%s\n' "$srv" "$((t1 - t0))" >>"$results"
    report_verify "$srv C-MOVE ct (run $rep)" "$(py verify "$dest_dir" "$work/ct.uids")"
    find "$dest_dir" -mindepth 1 -delete
  done
done
echo
py table-retrieve "$results" "$work/meta.sh" "$retrieve_mode"

# A server that stopped answering during the run is a real error.
for srv in "${qr_servers[@]}"; do
  wait_echo "${SRV_AE[$srv]}" "${SRV_PORT[$srv]}" "" 5 ||
    { echo "ERROR: $srv no longer answers C-ECHO at the end of the run"; failed=1; }
done
wait_echo BENCHDEST "$DEST_PORT" "${PIDS[dest]}" 5 ||
  { echo "ERROR: the C-MOVE destination storescp died during the run"; failed=1; }
((failed == 0)) || exit 1
say "done"
