#!/usr/bin/python3
"""Ingest with metrics off against on, through the same router of one
cluster (3 nodes, N=3, W=2), rounds interleaved so the machine's noise falls
on both modes alike. Each run stores new small 64x64 CT instances with 4
storescu associations. "off": the router has no admin port and nothing
scrapes; "on": the router serves its admin port and a scraper fetches
/metrics from the router and every node every 200 ms (5x a 1 s Prometheus
scrape interval) during the run. (The counters themselves are always
updated: they are a few relaxed atomic adds per operation.) Also prints how
long one scrape of the busy router takes. Asserts nothing.

Usage: tests/bench/admin_overhead.py [--per-run 1000] [--rounds 3]
(programs from SP_BUILD_DIR, by default the repository's build/)
"""
import argparse
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402
from test_access import ingest_seconds  # noqa: E402

ADMIN = {"admin": {"listen": "127.0.0.1:0"}}


def port_of(proc):
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", proc.log_text(this_run=True))
    return int(m.group(1))


class Scraper(threading.Thread):
    """Fetches every URL each `period` s; keeps the router's fetch times."""

    def __init__(self, urls, router_url, period=0.2):
        super().__init__(daemon=True)
        self.urls, self.router_url, self.period = urls, router_url, period
        self.stop_flag = threading.Event()
        self.router_ms, self.router_bytes = [], 0

    def run(self):
        s = requests.Session()
        while not self.stop_flag.is_set():
            for u in self.urls:
                t = time.perf_counter()
                r = s.get(u, timeout=5)
                if u == self.router_url:
                    self.router_ms.append((time.perf_counter() - t) * 1000)
                    self.router_bytes = len(r.content)
            self.stop_flag.wait(self.period)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-run", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rates = {"off": [], "on": []}
    scrape_ms = []
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with sc.cluster(base / "cluster", nodes=3, node_extra=ADMIN) as c:
            r = c.router
            node_urls = [f"http://127.0.0.1:{port_of(n)}/metrics" for n in c.nodes]
            seed = 300
            for rnd in range(args.rounds):
                for mode in ("off", "on"):
                    r.stop()
                    r.extra = ADMIN if mode == "on" else ""
                    r.start()
                    seed += 1
                    data = gen.make_bulk_set(base / f"d{seed}", small=args.per_run, ct=0,
                                             studies=8, seed=seed)
                    scraper = None
                    if mode == "on":
                        url = f"http://127.0.0.1:{port_of(r)}/metrics"
                        scraper = Scraper(node_urls + [url], url)
                        scraper.start()
                    rate = args.per_run / ingest_seconds(r.port, data.small_paths)
                    if scraper:
                        scraper.stop_flag.set()
                        scraper.join()
                        scrape_ms += scraper.router_ms
                        size = scraper.router_bytes
                    rates[mode].append(rate)
                    print(f"round {rnd + 1} metrics {mode:3s}: {rate:7.0f} instances/s", flush=True)
    med = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    print(f"\n4 associations, small images, {args.rounds} rounds of {args.per_run}, medians:")
    for m in ("off", "on"):
        print(f"  metrics {m:3s}: {med[m]:7.0f} instances/s  ({med[m] / med['off']:.3f} x off)")
    scrape_ms.sort()
    if scrape_ms:
        print(f"one /metrics scrape of the busy router ({size} bytes): median "
              f"{scrape_ms[len(scrape_ms) // 2]:.2f} ms, max {scrape_ms[-1]:.2f} ms over "
              f"{len(scrape_ms)} scrapes")


if __name__ == "__main__":
    main()
