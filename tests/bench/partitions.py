#!/usr/bin/python3
"""Figures of a cluster spread over sites (network namespaces, as in
tests/cluster/test_partitions.py; needs root):

1. ingest rate (one storescu association, tiny instances) through a router
   at site A, N=3, W=2, with no delay and with 40 ms each way between the
   sites, for two layouts: nodes A,A,B (two replicas local to the router)
   and A,B,B (one local: W needs a remote one);
2. time from the loss of site B (every B host cut off) to writes
   succeeding again at site A (one instance per association, in a loop);
3. time from the heal to full replication (nothing under-replicated, no
   hint pending).

Usage: sudo /usr/bin/python3 tests/bench/partitions.py [--count N]
(programs from SP_BUILD_DIR, default build/). Prints a Markdown table.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
import netns  # noqa: E402
import spcluster as sc  # noqa: E402
import test_partitions as tp  # noqa: E402


def store(sim, site, paths):
    """One storescu association; returns (acknowledged, seconds)."""
    r, c = sim.router_of(site), sim.clients[site]
    t = time.monotonic()
    p = sc.dcmtk([*c.prefix, "storescu", "-d", "-nh", "-to", "5", "-ta", "10", "-td", "10",
                  "-aec", tp.AE, r.addr, r.port, *paths], check=False, timeout=120)
    return sum(1 for _, st in sc.store_responses(p.out) if st == 0), time.monotonic() - t


def ingest_rate(root, data, layout, delay, count):
    sim = tp.Sim(root, layout, ["A"])
    try:
        if delay:
            sim.net.wan("A", "B", delay_ms=delay)
        store(sim, "A", data.take(5))  # warm-up: connections to every node
        acked, secs = store(sim, "A", data.take(count))
        assert acked == count, (acked, count)
        return count / secs
    finally:
        sim.close()


def site_loss(root, data, limit=60):
    """(seconds from the cut to the first success after which none failed,
    failures meanwhile, seconds from the heal to full replication)."""
    sim = tp.Sim(root, ["A", "A", "B", "B"], ["A", "B"])
    try:
        store(sim, "A", data.take(6))
        t_cut = time.monotonic()
        sim.net.isolate(sim.net.site_hosts("B"))
        outcomes = []
        while time.monotonic() - t_cut < limit and len(outcomes) < 200:
            acked, _ = store(sim, "A", data.take(1))
            outcomes.append((time.monotonic(), acked == 1))
            if len(outcomes) >= 10 and all(ok for _, ok in outcomes[-10:]):
                break
        fails = [t for t, ok in outcomes if not ok]
        first_ok = next(t for t, ok in outcomes if ok and (not fails or t > fails[-1]))
        t_heal = time.monotonic()
        sim.net.heal()
        sc.wait_until(sim.healed, 120, "full replication", sim.brief)
        return first_ok - t_cut, len(fails), time.monotonic() - t_heal
    finally:
        sim.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100, help="instances per ingest run")
    args = ap.parse_args()
    why = netns.unavailable()
    if why:
        sys.exit(f"partitions.py: {why}")
    with tempfile.TemporaryDirectory(prefix="sp-bench-part-") as tmp:
        tmp = Path(tmp)
        data = tp.Data(tmp / "data", 4 * (args.count + 5) + 220)
        rows = []
        for layout in (["A", "A", "B"], ["A", "B", "B"]):
            rates = [ingest_rate(tmp / f"i{len(rows)}{d}", data, layout, d, args.count)
                     for d in (0, 40)]
            rows.append((",".join(layout), *rates))
        to_ok, fails, to_full = site_loss(tmp / "loss", data)
    print("| nodes (router at A) | ingest, no delay | ingest, 40 ms A<->B | ratio |")
    print("|---|---|---|---|")
    for layout, r0, r40 in rows:
        print(f"| {layout} | {r0:.0f}/s | {r40:.0f}/s | {r40 / r0:.2f} |")
    print()
    print("| site B lost (A,A,B,B; routers at A and B) | value |")
    print("|---|---|")
    print(f"| writes at A succeed again after the cut | {to_ok:.1f} s ({fails} failed meanwhile) |")
    print(f"| full replication after the heal | {to_full:.1f} s |")


if __name__ == "__main__":
    main()
