#!/usr/bin/python3
"""DICOMweb series metadata benchmark: the time to answer
GET /studies/{s}/series/{se}/metadata for one series of 512x512 CT, cold
(nothing in the router's metadata cache) and warm (cached), and how many
object bytes the nodes read meanwhile. Run it after a build:

    /usr/bin/python3 tests/bench/metadata.py [--ct N] [--runs N]

One cluster (3 nodes, N=3, W=2, one router with DICOMweb over plain HTTP,
authentication off, all on loopback, ports chosen free). The series goes in
through storescu; then each cold request asks under a base URL not seen
before (a `Forwarded: host=...` header: the cache is keyed by the instance
URLs the JSON holds), and each warm one repeats the last. Programs come from
SP_BUILD_DIR (default: the repository's build/), so the same script measures
an older build; nodes without the `object_bytes_read` counter report "-".
`--save FILE` keeps the first answer, to compare the JSON of two builds.

Prints a Markdown table; asserts nothing about speed. Progress on stderr."""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402


def object_bytes_read(c):
    try:
        return sum(n.stats(c.admin_key)["object_bytes_read"] for n in c.nodes)
    except KeyError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct", type=int, default=500, help="512x512 CT instances in the series")
    ap.add_argument("--runs", type=int, default=5, help="cold and warm requests each")
    ap.add_argument("--save", help="write the first cold answer here (to compare two builds: "
                    "the data set and URLs are the same in every run)")
    args = ap.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")
    with tempfile.TemporaryDirectory(prefix="sp-bench-metadata.") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        bulk = gen.make_bulk_set(root / "ds", small=0, ct=args.ct, studies=1)
        print(f"made {args.ct} instances in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        port = sc.free_port()
        http = {"port": str(port), "bind": "127.0.0.1", "auth": "off"}
        c = sc.cluster(root / "c", nodes=3, router_extra={"http": http})
        try:
            sc.wait_port(port)
            t0 = time.monotonic()
            gen.run_tool(["storescu", "-aec", "SHARDPACS", "+sd", "+r", "127.0.0.1",
                          str(c.router.port), str(root / "ds" / "ct")], timeout=1800)
            print(f"stored in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            study = bulk.study_uids[0]
            series = f"{gen.BULK_ROOT}.0.2.1.2"
            url = f"http://127.0.0.1:{port}/dicom-web/studies/{study}/series/{series}/metadata"
            s = requests.Session()
            s.trust_env = False
            cold, warm, warm_gz, read = [], [], [], []
            size = gz_size = 0
            for run in range(args.runs):
                hdr = {"Forwarded": f"host=bench{run}.example", "Accept-Encoding": "identity"}
                before = object_bytes_read(c)
                t = time.monotonic()
                r = s.get(url, headers=hdr)
                cold.append(time.monotonic() - t)
                assert r.status_code == 200 and len(r.json()) == args.ct, r.status_code
                after = object_bytes_read(c)
                read.append(None if before is None else after - before)
                size = len(r.content)
                if args.save and run == 0:
                    Path(args.save).write_bytes(r.content)
                t = time.monotonic()
                r = s.get(url, headers=hdr)
                warm.append(time.monotonic() - t)
                t = time.monotonic()
                r = s.get(url, headers=dict(hdr, **{"Accept-Encoding": "gzip"}), stream=True)
                gz_size = len(r.raw.read())
                warm_gz.append(time.monotonic() - t)
        finally:
            c.stop()
    med = statistics.median
    ms = lambda v: f"{1000 * med(v):.0f} ms"  # noqa: E731
    rd = "-" if read[0] is None else f"{med(read) / 1e6:.1f} MB"
    print(f"| series of {args.ct} CT 512x512 | cold | warm | warm gzip | JSON | gzip "
          f"| object bytes read per cold request |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {os.environ.get('SP_BUILD_DIR', 'build')} | {ms(cold)} | {ms(warm)} "
          f"| {ms(warm_gz)} | {size / 1e6:.2f} MB | {gz_size / 1e3:.0f} KB | {rd} |")


if __name__ == "__main__":
    main()
