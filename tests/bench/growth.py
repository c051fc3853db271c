#!/usr/bin/python3
"""Growth benchmark: does ingest stay as fast while the archive grows?

    /usr/bin/python3 tests/bench/growth.py [--total N] [--round N]
                                          [--per-study N] [--nodes N]
                                          [--replicas N] [--keep DIR]

One cluster (deploy/local-cluster.sh: --nodes nodes, --replicas copies,
product defaults, ports chosen free, loopback only) takes --total small CT
instances (64x64, ~10 KB files) in rounds of --round, each round stored
with 4 storescu associations (TCP_NODELAY=1). Every round's files are new
(fresh UIDs: round number in the UID root), written just before the round
from one pydicom-made template with its UIDs patched byte for byte (making
a million files with pydicom itself would take longer than storing them),
and deleted after it.

Per round it prints the instances stored so far, the round's rate, the CPU
seconds of the router and of the nodes (utime + stime from /proc), the disk
bytes written per byte stored (/proc/diskstats of the work folder's device,
from before the round to its end: WAL, flushes and whatever compaction ran
meanwhile) and RocksDB's pending compaction bytes summed over the nodes (the
debt a slowdown would come from). At the end every node's instance count
is checked against what was sent (N copies on N nodes: all of them).

Prints a Markdown table; asserts nothing about speed. Progress on stderr."""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import dataset  # noqa: E402

CLUSTER_SH = ROOT / "deploy" / "local-cluster.sh"
ENV = dict(os.environ, TCP_NODELAY="1")

# Fixed-width placeholders in the template, patched per file. Each value
# written over one has the same length (no leading zeros in UID components).
STUDY, SERIES, SOP, PATIENT = "9000000001", "9000000002", "9000000000003", "9000000004"


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def template(work: Path):
    """The bytes of one 64x64 instance whose UIDs and patient ID are the
    placeholders, and where each placeholder occurs."""
    ds, pixels = dataset._bulk_template(64, 0)
    ds.StudyInstanceUID = f"{dataset.BULK_ROOT}.9.1.{STUDY}"
    ds.SeriesInstanceUID = f"{dataset.BULK_ROOT}.9.2.{SERIES}"
    ds.SOPInstanceUID = f"{dataset.BULK_ROOT}.9.3.{SOP}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.FrameOfReferenceUID = ds.StudyInstanceUID
    ds.PatientID = f"G{PATIENT}"
    ds.PatientName = f"Growth^{PATIENT}"
    ds.PixelData = bytes(pixels)
    path = work / "template.dcm"
    ds.save_as(str(path), write_like_original=False)
    data = path.read_bytes()
    spots = []
    for key in (STUDY, SERIES, SOP, PATIENT):
        spots += [(m.start(), key) for m in re.finditer(re.escape(key.encode()), data)]
    return bytearray(data), spots


def write_round(tpl, spots, out: Path, rnd: int, count: int, per_study: int):
    """count files of round rnd into out; returns their paths and bytes."""
    for q in range(4):
        (out / f"q{q}").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        s = rnd * 1_000_000 + i // per_study
        values = {STUDY: f"{9000000000 - s}", SERIES: f"{8000000000 - s}",
                  SOP: f"{9000000000000 - rnd * 10_000_000 - i}",
                  PATIENT: f"{9000000000 - s // 2}"}
        for off, key in spots:
            v = values[key].encode()
            assert len(v) == len(key)
            tpl[off:off + len(v)] = v
        p = out / f"q{i % 4}" / f"{i:07d}.dcm"
        p.write_bytes(tpl)
        paths.append(p)
    return paths, count * len(tpl)


def ingest(port, rdir: Path):
    """Seconds to store the round's four quarters (rdir/q0..q3), one storescu
    association each, and the number of files storescu reported failed."""
    t = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-nh", "+sd", "-aec", "SHARDPACS", "127.0.0.1",
                               str(port), str(rdir / f"q{q}")], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for q in range(4)]
    failed = 0
    for p in procs:
        _, err = p.communicate(timeout=3600)
        failed += sum(1 for line in err.splitlines() if line.startswith("E:"))
    return time.monotonic() - t, failed


def disk_device(path: Path):
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    name = Path(f"/sys/dev/block/{dev}").resolve().name
    return name


def sectors_written(dev):
    for line in open("/proc/diskstats"):
        f = line.split()
        if f[2] == dev:
            return int(f[9]) * 512
    return 0


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def pending_compaction(cdir: Path, nodes):
    total = 0
    for k in range(1, nodes + 1):
        port = (cdir / f"n{k}" / "admin.port").read_text().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("shardpacs_rocksdb_pending_compaction_bytes"):
                    total += float(line.split()[-1])
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--round", type=int, default=100_000)
    ap.add_argument("--per-study", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="work folder to use and keep")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sp-growth-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    cdir = work / "cluster"
    port = free_port()
    say(f"growth: {args.total} instances in rounds of {args.round}, {args.nodes} nodes, "
        f"N={args.replicas}, work {work}")
    subprocess.run([str(CLUSTER_SH), "up", str(cdir), "--nodes", str(args.nodes),
                    "--replicas", str(args.replicas),
                    "--quorum", str(min(args.replicas, args.replicas // 2 + 1)),
                    "--port", str(port), "--http-port", str(free_port()), "--no-viewer"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        tpl, spots = template(work)
        dev = disk_device(work)
        pids = {"router": [int((cdir / "router.pid").read_text())],
                "nodes": [int((cdir / f"n{k}" / "node.pid").read_text())
                          for k in range(1, args.nodes + 1)]}
        rows, stored, rnd = [], 0, 0
        while stored < args.total:
            n = min(args.round, args.total - stored)
            rdir = work / "round"
            paths, nbytes = write_round(tpl, spots, rdir, rnd + 1, n, args.per_study)
            subprocess.run(["sync"], check=True)
            cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
            d0 = sectors_written(dev)
            secs, failed = ingest(port, rdir)
            cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
            subprocess.run(["sync"], check=True)
            disk = sectors_written(dev) - d0
            pending = pending_compaction(cdir, args.nodes)
            stored += n
            rnd += 1
            row = (stored, n / secs, failed, cpu1["router"] - cpu0["router"],
                   cpu1["nodes"] - cpu0["nodes"], disk / (nbytes * args.replicas), pending)
            rows.append(row)
            say(f"round {rnd}: {stored} stored, {n / secs:,.0f}/s, failed {failed}, "
                f"disk {row[5]:.2f} B/B, pending compaction {pending / 1e6:,.0f} MB")
            shutil.rmtree(rdir)
        out = subprocess.run([str(CLUSTER_SH), "status", str(cdir), "--json"],
                             capture_output=True, text=True, check=True).stdout
        counts = [m["instances"] for m in json.loads(out)["members"] if m["role"] == "storage"]
    finally:
        subprocess.run([str(CLUSTER_SH), "down", str(cdir)], stdout=subprocess.DEVNULL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n### Growth: {args.total:,} small CT (~{len(tpl) / 1024:.0f} KiB) in rounds of "
          f"{args.round:,}, {args.nodes} nodes, N={args.replicas}, 4 associations\n")
    print("| stored after round | inst/s in round | failed | router CPU-s | nodes CPU-s "
          "| disk B per B stored | pending compaction, MB |")
    print("|---|---|---|---|---|---|---|")
    for stored, rate, failed, rc, nc, dpb, pend in rows:
        print(f"| {stored:,} | {rate:,.0f} | {failed} | {rc:.1f} | {nc:.1f} | {dpb:.2f} "
              f"| {pend / 1e6:,.0f} |")
    print(f"\nInstances on each node at the end: {counts} (sent {stored:,}).")
    if any(c != stored for c in counts) and args.replicas == args.nodes:
        print(f"LOST: a node holds fewer than the {stored} instances sent")


if __name__ == "__main__":
    main()
