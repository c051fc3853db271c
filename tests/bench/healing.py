#!/usr/bin/python3
"""Self-healing benchmark of a local ShardPACS cluster (run through
tests/bench/healing.sh, which builds first; --help for options).

One run, on a cluster made by deploy/local-cluster.sh (N=3, W=2, its
demo failure timings unless overridden):

1. preload: --mb MB of 512x512 CT (~526 KB each) through the router with 4
   storescu associations, then wait for full replication;
2. baseline ingest: a mixed set (small 64x64 CT and 512x512 CT) with 4
   associations, timed, nothing else going on;
3. kill -9 one node; from the members' logs ("member nK alive -> suspect"
   lines, millisecond UTC timestamps) the time until the first member
   suspects it, every member has it down, every member has it out;
4. as soon as the first member has it out (re-replication starts), a second
   mixed set of the same shape is ingested, timed, while `shardpacs status
   --json` is polled until nothing is under-replicated: time to full
   replication, bytes copied (sum of the survivors' repair_bytes_done), MB/s;
5. ingest rate during repair relative to the baseline, with the share of
   that ingest that really overlapped the repair.

Prints Markdown tables; asserts nothing about speed. Exits non-zero only on
real errors (the cluster does not start, a wait passes its deadline).
Progress goes to stderr."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import dataset  # noqa: E402
from spcluster import free_port  # noqa: E402

CLUSTER_SH = ROOT / "deploy" / "local-cluster.sh"
ENV = dict(os.environ, TCP_NODELAY="1")
T0 = time.monotonic()
LINE = re.compile(r"^(\S+Z) .*member (\S+) (\S+) -> (\S+) \(incarnation", re.M)


def say(text):
    print(f"healing [{time.monotonic() - T0:4.0f}s]: {text}", file=sys.stderr, flush=True)


def cluster(*args, check=True, timeout=300):
    p = subprocess.run([str(CLUSTER_SH), *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"healing: local-cluster.sh {' '.join(map(str, args))} failed:\n"
                         f"{p.stdout}{p.stderr}")
    return p


def status(cdir):
    p = cluster("status", cdir, "--json", check=False, timeout=30)
    return json.loads(p.stdout) if p.returncode == 0 else None


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"healing: timed out after {timeout} s waiting for {what}")


def healed(cdir):
    st = status(cdir)
    return st if st and st["under_replicated_partitions"] == 0 and st["hints_pending"] == 0 \
        else None


def store(port, paths, conc, log):
    """storescu -nh -v over `conc` associations (contiguous shares); returns
    (seconds, C-STOREs not answered Success, exit statuses)."""
    paths = [str(p) for p in paths]
    share = (len(paths) + conc - 1) // conc
    t0 = time.monotonic()
    procs = []
    with open(log, "a") as f:
        for i in range(conc):
            part = paths[i * share:(i + 1) * share]
            if part:
                procs.append(subprocess.Popen(
                    ["storescu", "-nh", "-v", "-aet", "BENCH", "-aec", "SHARDPACS", "127.0.0.1",
                     str(port), *part], stdout=f, stderr=subprocess.STDOUT, env=ENV))
        rcs = [p.wait() for p in procs]
    seconds = time.monotonic() - t0
    ok = Path(log).read_text(errors="replace").count("Received Store Response (Success)")
    return seconds, len(paths) - ok, rcs


def parse_ts(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def transitions(logs, victim, since_wall):
    """{member log: {state: first wall time after since_wall}} for victim."""
    out = {}
    for name, path in logs.items():
        seen = {}
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for ts, member, _old, new in LINE.findall(text):
            if member != victim:
                continue
            t = parse_ts(ts)
            if t >= since_wall - 0.005:
                seen.setdefault(new, t)
        out[name] = seen
    return out


def survivors_done(st, victim):
    return sum(m.get("repair_bytes_done", 0) for m in st["members"]
               if m["role"] == "storage" and m["id"] != victim)


def mib(n):
    return n / 1048576


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--mb", type=int, default=300, help="MB preloaded before the kill")
    ap.add_argument("--ingest-small", type=int, default=1500)
    ap.add_argument("--ingest-ct", type=int, default=60)
    ap.add_argument("--down-to-out", default=None, help="e.g. 10s (local-cluster.sh default)")
    ap.add_argument("--repair-rate", default=None, help="e.g. 50M, 0 = unlimited")
    ap.add_argument("--victim", default=None, help="node to kill (default the last)")
    ap.add_argument("--quick", action="store_true",
                    help="--mb 60 --ingest-small 400 --ingest-ct 20")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    if a.quick:
        a.mb, a.ingest_small, a.ingest_ct = 60, 400, 20
    victim = a.victim or f"n{a.nodes}"
    work = Path(tempfile.mkdtemp(prefix="sphealing."))
    cdir = work / "cluster"
    up = False
    try:
        say(f"work folder {work}; making the data")
        ct_n = max(1, round(a.mb * 1e6 / 526000))
        pre = dataset.make_bulk_set(work / "preload", small=0, ct=ct_n, studies=40, seed=21)
        ing = [dataset.make_bulk_set(work / f"ingest{i}", small=a.ingest_small, ct=a.ingest_ct,
                                     studies=10, seed=22 + i) for i in (1, 2)]
        port = free_port()
        opts = ["--nodes", a.nodes, "--port", port, "--replicas", 3, "--quorum", 2]
        if a.down_to_out:
            opts += ["--down-to-out", a.down_to_out]
        if a.repair_rate:
            opts += ["--repair-rate", a.repair_rate]
        say("starting the cluster (deploy/local-cluster.sh up)")
        cluster("up", cdir, "--no-viewer", *opts)
        up = True
        env = dict(l.split("=", 1) for l in (cdir / "cluster.env").read_text().split())

        say(f"preloading {len(pre.paths)} CT ({mib(pre.total_bytes):.0f} MiB)")
        secs, fails, _ = store(port, pre.paths, 4, work / "storescu-preload.log")
        say(f"preload {secs:.1f} s, {fails} failed; waiting for full replication")
        wait(lambda: healed(cdir), 600, "full replication after the preload")

        say(f"baseline ingest: {ing[0].total_files} instances ({mib(ing[0].total_bytes):.0f} MiB)")
        base_s, base_fail, _ = store(port, ing[0].paths, 4, work / "storescu-base.log")
        wait(lambda: healed(cdir), 600, "full replication after the baseline ingest")
        st0 = status(cdir)
        done0 = survivors_done(st0, victim)
        stored_bytes = pre.total_bytes + ing[0].total_bytes
        held = next(m for m in st0["members"] if m["id"] == victim)

        logs = {f"n{i}": cdir / f"n{i}" / "node.log" for i in range(1, a.nodes + 1)
                if f"n{i}" != victim}
        if "member " in (cdir / "router.log").read_text(errors="replace"):
            logs["router"] = cdir / "router.log"
        say(f"kill -9 {victim} (it holds {held['instances']} instances, "
            f"{mib(held['bytes']):.0f} MiB)")
        t_kill = time.time()
        m_kill = time.monotonic()
        cluster("kill-node", cdir, victim)

        def first(state):
            tr = transitions(logs, victim, t_kill)
            times = [s[state] for s in tr.values() if state in s]
            return min(times) if times else None

        def everyone(state):
            tr = transitions(logs, victim, t_kill)
            if all(state in s for s in tr.values()):
                return max(s[state] for s in tr.values())
            return None
        out_first = wait(lambda: first("out"), 600, f"{victim} out")
        say(f"{victim} out at {out_first - t_kill:.1f} s; ingesting during the repair")
        box = {}

        def ingest_during():
            box["t0"] = time.monotonic()
            box["res"] = store(port, ing[1].paths, 4, work / "storescu-repair.log")
            box["t1"] = time.monotonic()
        th = threading.Thread(target=ingest_during)
        th.start()
        samples = []
        while True:
            st = status(cdir)
            now = time.monotonic()
            if st:
                samples.append((now, st["repair"]["bytes_pending"],
                                st["repair"]["rate_bytes_per_s"]))
                if st["under_replicated_partitions"] == 0 and now - box.get("t0", now) > 0.5:
                    m_full, st_full = now, st
                    break
            if now - m_kill > 1800:
                raise SystemExit("healing: no full replication within 30 minutes")
            time.sleep(0.25)
        th.join()
        rep_s, rep_fail, _ = box["res"]
        down_all = everyone("down")
        out_all = everyone("out")
        suspect_first = first("suspect")
        wait(lambda: healed(cdir), 600, "full replication after the ingest during repair")
        done1 = survivors_done(status(cdir), victim)
        copied_until_full = survivors_done(st_full, victim) - done0

        # ---- tables ----
        def rel(t):
            return f"{t - t_kill:.2f}" if t else "—"
        print(f"ShardPACS self-healing benchmark, {datetime.now(timezone.utc):%Y-%m-%d}, "
              f"{os.cpu_count()} CPUs; {a.nodes} nodes, N=3, W=2 on one host "
              f"(deploy/local-cluster.sh); probe {env.get('PROBE_INTERVAL')}, "
              f"down->out {env.get('DOWN_TO_OUT')}, repair rate {env.get('REPAIR_RATE')} "
              f"(0 = unlimited), repair interval {env.get('REPAIR_INTERVAL')}.\n")
        print(f"### Failure detection: kill -9 of {victim}, seconds after the kill "
              f"(from the members' own log lines)\n")
        print("| event | seconds |")
        print("|---|---|")
        print(f"| first member suspects it | {rel(suspect_first)} |")
        print(f"| every member ({', '.join(logs)}) has it down | {rel(down_all)} |")
        print(f"| first member has it out (re-replication starts) | {rel(out_first)} |")
        print(f"| every member has it out | {rel(out_all)} |")
        print()
        full_after_out = m_full - (m_kill + (out_first - t_kill))
        print(f"### Re-replication of what {victim} held, while an ingest runs\n")
        print("| stored in the cluster | held by the dead node | copied until full replication "
              "| out → full (s) | kill → full (s) | repair MB/s |")
        print("|---|---|---|---|---|---|")
        print(f"| {mib(stored_bytes):,.0f} MiB | {held['instances']:,} instances, "
              f"{mib(held['bytes']):,.0f} MiB | {mib(copied_until_full):,.0f} MiB "
              f"| {full_after_out:.1f} | {m_full - m_kill:.1f} "
              f"| {copied_until_full / 1e6 / max(full_after_out, 1e-3):.1f} |")
        print()
        n_ing = ing[0].total_files
        overlap = max(0.0, min(m_full, box["t1"]) - box["t0"]) / max(box["t1"] - box["t0"], 1e-3)
        print(f"### Ingest ({n_ing:,} instances, {mib(ing[0].total_bytes):.0f} MiB, "
              "4 storescu associations): instances/s (MiB/s)\n")
        print("| ingest | instances/s (MiB/s) | failed C-STOREs | relative |")
        print("|---|---|---|---|")
        print(f"| without repair (all {a.nodes} nodes) | {n_ing / base_s:,.0f} "
              f"({mib(ing[0].total_bytes) / base_s:,.1f}) | {base_fail} | 1.00 |")
        print(f"| during re-replication ({a.nodes - 1} nodes; {overlap:.0%} of it overlapped "
              f"the repair) | {ing[1].total_files / rep_s:,.0f} "
              f"({mib(ing[1].total_bytes) / rep_s:,.1f}) | {rep_fail} "
              f"| {base_s / rep_s * ing[1].total_files / n_ing:.2f} |")
        print()
        print(f"(repair bytes copied by the survivors in all: {mib(done1 - done0):,.0f} MiB; "
              f"peak reported repair rate "
              f"{max((s[2] for s in samples), default=0) / 1e6:.1f} MB/s)")
        return 0
    finally:
        if up:
            cluster("down", cdir, check=False)
        if a.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
