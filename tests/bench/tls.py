#!/usr/bin/python3
"""DICOM TLS benchmark: ingest through the router's TLS port against its
plain port, and the cost of setting up an association with TLS. Run it
after a build:

    /usr/bin/python3 tests/bench/tls.py [--small N] [--ct N] [--setups N] [--quick]

One cluster (3 nodes, N=3, W=2, one router serving plain DICOM and DICOM
TLS with client certificates required, all on loopback, ports chosen free)
is measured in one run:

1. ingest of --small 64x64 and --ct 512x512 CT instances with 4 storescu
   associations (storescu +tls with a client certificate on the TLS port),
   plain and TLS alternating, each on a data set of its own (fresh UIDs:
   no duplicates);
2. association set-up: connect, (TLS handshake,) A-ASSOCIATE-RQ until the
   A-ASSOCIATE-AC arrives, then release, from this process (no tool start),
   median and 90th percentile of --setups runs; and echoscu's whole run
   (process start included) plain and +tls.

Prints a Markdown table; asserts nothing about speed. Progress on stderr."""
import argparse
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import dataset  # noqa: E402
import spcluster  # noqa: E402
import tlscerts  # noqa: E402
import test_front_door as fd  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def ingest(port, paths, tls_args, associations=4):
    """Seconds to store paths with `associations` storescu processes."""
    parts = [paths[i::associations] for i in range(associations)]
    t = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-nh", "-aec", "SHARDPACS", *tls_args, "127.0.0.1",
                               str(port), *map(str, part)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for part in parts if part]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {err[-2000:]}")
    return time.monotonic() - t


def setup_once(port, ctx):
    """Seconds from connect to A-ASSOCIATE-AC (TLS handshake included when
    ctx is given); the association is then released."""
    t = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        s = ctx.wrap_socket(s)
    s.sendall(fd.assoc_rq(calling="BENCH"))
    kind, _ = fd.recv_pdu(s)
    took = time.monotonic() - t
    assert kind == 0x02, f"association not accepted (PDU type {kind})"
    s.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
    try:
        fd.recv_pdu(s)
    except (OSError, ConnectionError):
        pass
    s.close()
    return took


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--ct", type=int, default=300)
    ap.add_argument("--setups", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="--small 300 --ct 40 --setups 50")
    a = ap.parse_args()
    if a.quick:
        a.small, a.ct, a.setups = 300, 40, 50
    with tempfile.TemporaryDirectory(prefix="sp-bench-tls-") as tmp:
        tmp = Path(tmp)
        ca = tlscerts.make_ca(tmp / "ca")
        srv = tlscerts.make_cert(ca, tmp / "server", "router", server=True)
        cli = tlscerts.make_cert(ca, tmp / "client", "bench")
        tls_args = ["+tls", str(cli.key), str(cli.cert), "+cf", str(ca.cert)]
        say("making data sets")
        sets = {}
        for i, (kind, n) in enumerate((("small", a.small), ("ct", a.ct))):
            for j, mode in enumerate(("plain", "tls")):
                d = tmp / f"{kind}-{mode}"
                b = dataset.make_bulk_set(d, small=n if kind == "small" else 0,
                                          ct=n if kind == "ct" else 0, studies=10,
                                          seed=10 + 2 * i + j)
                sets[(kind, mode)] = list(b.small_paths if kind == "small" else b.ct_paths)
        extra = {"tls": {"enabled": "true", "port": "0", "certificate": str(srv.cert),
                         "key": str(srv.key), "ca": str(ca.cert)}}
        say("starting the cluster")
        with spcluster.Cluster(tmp / "c", nodes=3, router_extra=extra) as c:
            r = c.router
            import re
            tls_port = int(re.search(r"DICOM TLS on 127\.0\.0\.1:(\d+);",
                                     r.log_text()).group(1))
            ports = {"plain": (r.port, []), "tls": (tls_port, tls_args)}
            rows = []
            for kind in ("small", "ct"):
                res = {}
                for mode in ("plain", "tls"):
                    paths = sets[(kind, mode)]
                    port, targs = ports[mode]
                    say(f"ingest {kind} {mode}: {len(paths)} instances")
                    secs = ingest(port, paths, targs)
                    mib = sum(p.stat().st_size for p in paths) / (1 << 20)
                    res[mode] = (len(paths) / secs, mib / secs)
                rows.append((kind, res))
            # Association set-up, from this process.
            ctx = ssl.create_default_context(cafile=str(ca.cert))
            ctx.check_hostname = False
            ctx.load_cert_chain(str(cli.cert), str(cli.key))
            setup = {}
            say(f"association set-up x{a.setups} each")
            for mode in ("plain", "tls"):
                port = ports[mode][0]
                setup[mode] = [setup_once(port, ctx if mode == "tls" else None)
                               for _ in range(a.setups)]
            echo = {}
            for mode in ("plain", "tls"):
                port, targs = ports[mode]
                times = []
                for _ in range(20):
                    t = time.monotonic()
                    subprocess.run(["echoscu", "-aec", "SHARDPACS", *targs, "127.0.0.1",
                                    str(port)], env=ENV, check=True, capture_output=True)
                    times.append(time.monotonic() - t)
                echo[mode] = statistics.median(times)
            proto = "TLS 1.3"
            p = subprocess.run(["echoscu", "-d", "-aec", "SHARDPACS", *tls_args, "127.0.0.1",
                                str(tls_port)], env=ENV, capture_output=True, text=True)
            m = re.search(r"(TLSv1\.\d)", p.stdout + p.stderr)
            if m:
                proto = m.group(1)
    print(f"\n### DICOM TLS against plain DICOM (3 nodes, N=3, W=2; 4 storescu associations)\n")
    print("| data | plain inst/s (MiB/s) | TLS inst/s (MiB/s) | TLS/plain |")
    print("|---|---|---|---|")
    for kind, res in rows:
        (pi, pm), (ti, tm) = res["plain"], res["tls"]
        label = "small 64x64 CT" if kind == "small" else "CT 512x512"
        print(f"| {label} | {pi:,.0f} ({pm:.1f}) | {ti:,.0f} ({tm:.1f}) | {ti / pi:.2f} |")
    print("\n| association set-up | plain | TLS | TLS - plain |")
    print("|---|---|---|---|")
    for name, q in (("median", 0.5), ("90th percentile", 0.9)):
        pv, tv = pct(setup["plain"], q) * 1000, pct(setup["tls"], q) * 1000
        print(f"| connect to A-ASSOCIATE-AC, {name} (ms) | {pv:.2f} | {tv:.2f} | {tv - pv:.2f} |")
    pv, tv = echo["plain"] * 1000, echo["tls"] * 1000
    print(f"| echoscu whole run, median (ms) | {pv:.1f} | {tv:.1f} | {tv - pv:.1f} |")
    print(f"\n(echoscu +tls negotiated {proto}; in-process set-up used Python's ssl, "
          f"TLS 1.3 with an EC P-256 client certificate)")


if __name__ == "__main__":
    main()
