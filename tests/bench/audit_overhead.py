#!/usr/bin/python3
"""Ingest with the audit trail off, on with sync = write (the default) and on
with sync = commit, through the same router of one cluster (3 nodes, N=3,
W=2), rounds interleaved so the machine's noise falls on every mode alike.
Each run stores new small 64x64 CT instances with 4 storescu associations.
Prints instances/s per run and the medians; asserts nothing.

Usage: tests/bench/audit_overhead.py [--per-run 1000] [--rounds 3]
(programs from SP_BUILD_DIR, by default the repository's build/)
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402
from test_access import ingest_seconds  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-run", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    modes = {"off": {"file": ""}, "write": {"sync": "write"}, "commit": {"sync": "commit"}}
    rates = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rules = base / "rules.txt"
        rules.write_text("* allow=all\n")
        with sc.cluster(base / "cluster", nodes=3) as c:
            r = c.router
            seed = 200
            for rnd in range(args.rounds):
                for mode, audit in modes.items():
                    r.stop()
                    r.extra = {"access": {"rules": str(rules)}, "audit": audit}
                    r.start()
                    seed += 1
                    data = gen.make_bulk_set(base / f"d{seed}", small=args.per_run, ct=0,
                                             studies=8, seed=seed)
                    rate = args.per_run / ingest_seconds(r.port, data.small_paths)
                    rates[mode].append(rate)
                    print(f"round {rnd + 1} audit {mode:6s}: {rate:7.0f} instances/s", flush=True)
    med = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    print(f"\n4 associations, small images, {args.rounds} rounds of {args.per_run}, medians:")
    for m in modes:
        print(f"  audit {m:6s}: {med[m]:7.0f} instances/s  ({med[m] / med['off']:.3f} x off)")


if __name__ == "__main__":
    main()
