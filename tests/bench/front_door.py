#!/usr/bin/python3
"""Front-door benchmark: ingest and C-FIND with and without 200 hostile
connections held open, and peak memory of the router and the nodes while 16
clients store 256 MiB each at once. Run it after a build:

    /usr/bin/python3 tests/bench/front_door.py [--small N] [--finds N]
                                              [--hostile N] [--big N] [--quick]

One cluster (3 nodes, N=3, W=2, one router, all on loopback, ports chosen
free) is measured in one run:

1. ingest of --small 64x64 CT instances with 4 storescu associations, and
   the median of --finds study-level findscu runs, with nothing else going on;
2. the same with --hostile raw connections held open from 127.0.0.2 and up
   (steps 1 and 2 alternate for --rounds rounds; medians are shown)
   (a third silent, a third with an association established and idle, a
   third trickling a C-STORE data set two bytes every half second), with a
   second data set of the same shape (fresh UIDs: no duplicates);
3. --big clients storing one 256 MiB CT each at once (a second cluster with
   [dicom] receive_memory 1G and receive_wait 40 s, under storescu's own 60 s
   send timeout; a store told 0xA700 sends again), with the router's and
   every node's peak resident memory (VmHWM). --big 0 skips it.

Prints Markdown tables; asserts nothing about speed. Progress on stderr."""
import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import dataset  # noqa: E402
import spcluster  # noqa: E402
import test_big_objects  # noqa: E402
import test_front_door as fd  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def ingest(port, paths, associations=4):
    """Seconds to store paths with `associations` storescu processes."""
    parts = [paths[i::associations] for i in range(associations)]
    t = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-nh", "-aec", "SHARDPACS", "127.0.0.1", str(port),
                               *map(str, part)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for part in parts if part]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {err[-2000:]}")
    return time.monotonic() - t


def find_ms(port, study_uid, runs):
    times = []
    for _ in range(runs):
        t = time.monotonic()
        p = subprocess.run(["findscu", "-S", "-aec", "SHARDPACS", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientName",
                            "127.0.0.1", str(port)], env=ENV, capture_output=True, timeout=60)
        if p.returncode != 0:
            raise SystemExit(f"findscu failed: {p.stderr[-2000:]}")
        times.append((time.monotonic() - t) * 1000)
    return statistics.median(times)


class Hostile:
    """n raw connections: silent, idle associations and trickling stores,
    a third each, from 127.0.0.2 and up, driven until stop()."""

    def __init__(self, port, n):
        third = n // 3
        self.silent = fd.connect_many(port, third, first_address=2)
        self.idle = fd.connect_many(port, third, first_address=2 + third // fd.PER_ADDRESS + 1)
        for s in self.idle:
            s.sendall(fd.assoc_rq())
            kind, _ = fd.recv_pdu(s)
            if kind != 0x02:
                raise SystemExit(f"idle association refused (PDU {kind})")
        self.trickle = fd.connect_many(port, n - 2 * third,
                                       first_address=2 + 2 * (third // fd.PER_ADDRESS + 1))
        for s in self.trickle:
            s.sendall(fd.assoc_rq())
            kind, _ = fd.recv_pdu(s)
            if kind != 0x02:
                raise SystemExit(f"trickling association refused (PDU {kind})")
            s.sendall(fd.store_command("1.2.3.4.5"))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self):
        pdv = struct.pack(">IBB", 4, 3, 0x00) + b"\x08\x00"
        pdu = struct.pack(">BBI", 4, 0, len(pdv)) + pdv
        while not self.stop_event.wait(0.5):
            for s in self.trickle:
                fd.send_quietly(s, pdu)

    def count_open(self):
        alive = 0
        for s in self.silent + self.idle + self.trickle:
            try:
                s.setblocking(False)
                alive += s.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
            finally:
                s.setblocking(True)
        return alive

    def stop(self):
        self.stop_event.set()
        self.thread.join(5)
        fd.close_all(self.silent + self.idle + self.trickle)


def front_door(args, work):
    say("cluster: 3 nodes, N=3, W=2")
    sets = [dataset.make_bulk_set(work / f"set{i}", small=args.small, ct=0, studies=10, seed=40 + i)
            for i in range(2 * args.rounds)]
    # Rounds alternate quiet and hostile (the machine's noise falls on both);
    # each round stores a fresh data set (same UIDs would be duplicates).
    with spcluster.cluster(work / "c1", nodes=3, replicas=3, quorum=2) as c:
        port = c.routers[0].port
        runs = {"quiet": [], "hostile": []}
        for rnd in range(args.rounds):
            for label, hostile_n in (("quiet", 0), ("hostile", args.hostile)):
                bulk = sets[len(runs["quiet"]) + len(runs["hostile"])]
                hostile = Hostile(port, hostile_n) if hostile_n else None
                try:
                    if hostile:
                        time.sleep(1)
                    say(f"round {rnd + 1} {label}: ingest of {len(bulk.small_paths)} instances")
                    secs = ingest(port, bulk.small_paths)
                    ms = find_ms(port, bulk.study_uids[0], args.finds)
                    still = hostile.count_open() if hostile else 0
                finally:
                    if hostile:
                        hostile.stop()
                runs[label].append((still, len(bulk.small_paths) / secs, ms))
        rows = []
        for label, n in (("quiet", 0), ("hostile", args.hostile)):
            rows.append((label, n, min(x[0] for x in runs[label]),
                         statistics.median(x[1] for x in runs[label]),
                         statistics.median(x[2] for x in runs[label])))
    q, h = rows
    print("\n### Front door under hostile connections\n")
    print(f"| run ({args.rounds} rounds, interleaved; medians) | hostile connections (fewest "
          "still open at a round's end) | ingest, inst/s | C-FIND median, ms |")
    print("|---|---|---|---|")
    for label, n, still, rate, ms in rows:
        print(f"| {label} | {n} ({still}) | {rate:,.0f} | {ms:.1f} |")
    print(f"| ratio hostile/quiet | | {h[3] / q[3]:.2f} | {q[4] / h[4]:.2f} (speed) |")


def big_stores(args, work):
    say(f"big: {args.big} x 256 MiB at once, receive_memory 1G")
    d = work / "big"
    d.mkdir()
    test_big_objects.STORES = args.big
    files, _ = test_big_objects.make_files(d, "1.2.826.0.1.3680043.8.498.78.1")
    extra = {"dicom": {"receive_memory": "1G", "receive_wait": "40s", "max_object_size": "512M",
                       "workers": "32", "dimse_timeout": "5m"},
             "cluster": {"store_timeout": "60s"}}
    with spcluster.cluster(work / "c2", nodes=3, replicas=3, quorum=2, router_extra=extra) as c:
        r = c.routers[0]
        t = time.monotonic()
        retried = test_big_objects.store_all(r.port, files)
        secs = time.monotonic() - t
        router = test_big_objects.peak_rss(r.proc.pid)
        nodes = [test_big_objects.peak_rss(n.proc.pid) for n in c.nodes]
    mib = args.big * 256
    print(f"\n### {args.big} concurrent 256 MiB stores (N=3, W=2, receive_memory 1 GiB)\n")
    print("| stored | sends retried after 0xA700 | seconds | MiB/s | router peak, MiB | "
          "node peaks, MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.big} | {retried} | {secs:.1f} | {mib / secs:.0f} | {router >> 20} | "
          f"{', '.join(str(n >> 20) for n in nodes)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--finds", type=int, default=20)
    ap.add_argument("--hostile", type=int, default=200)
    ap.add_argument("--big", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="quiet/hostile pairs (median shown)")
    ap.add_argument("--quick", action="store_true", help="--small 300 --finds 5 --big 4")
    args = ap.parse_args()
    if args.quick:
        args.small, args.finds, args.big = 300, 5, 4
    with tempfile.TemporaryDirectory(prefix="spbench-") as tmp:
        work = Path(tmp)
        front_door(args, work)
        if args.big:
            big_stores(args, work)


if __name__ == "__main__":
    main()
