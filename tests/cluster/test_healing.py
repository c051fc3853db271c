"""Fault tests of a whole ShardPACS cluster healing itself, driven through the
router with DCMTK's real clients (storescu, findscu, getscu; TCP_NODELAY=1)
while storage nodes are killed (kill -9), paused (SIGSTOP/SIGCONT), added,
drained and corrupted. Each test asserts that every instance whose C-STORE
returned Success is retrievable bit-exact (C-GET through the router, data set
after the file meta header compared with what a bit-preserving storescp
received from the same storescu) and prints its counts: instances sent,
acknowledged and retrieved, and how long healing took.

The data: one bulk set (tests/cluster/dataset.py make_bulk_set) of small CT
images (~10 KB, inline RocksDB values) with a few 512x512 CT (~526 KB, RocksDB
blob files) mixed in, over 10 studies. An `Ingest` thread sends it in
batches (one storescu per batch, a minimum time per batch so that it spans
the fault) and re-sends what was not acknowledged, as a modality would.

Timings are short: gossip probe 200 ms (suspicion about a second), down ->
out after 3 s, repair rounds every second without a rate limit. Every wait
has a deadline. What the cluster says about itself is read with
`shardpacs status --json` / `locate --json` and `shardpacs node ... list`.

Run: /usr/bin/python3 -m pytest -q -s tests/cluster/test_healing.py
(programs from SP_BUILD_DIR, by default the repository's build/)
"""
import collections
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402
from spcluster import wait_until as wait_for  # noqa: E402

AE = "SHARDPACS"
SMALL, CT, STUDIES = 300, 12, 10

GOSSIP = ("[gossip]\nprobe_interval = 200ms\nprobe_timeout = 100ms\nsuspicion_mult = 3\n"
          "suspicion_max_mult = 2\nsync_interval = 1s\ndown_to_out = {down_to_out}\n")
REPAIR = ("[repair]\ninterval = 1s\nrate = 0\nstreams = 2\nscrub_interval = {scrub_interval}\n"
          "scrub_rate = 0\n")
# Stores give up after 3 s (the modality retries); reads wait at most 5 s for
# one replica before the next.
ROUTER_OPTS = {"store_timeout": "3s", "query_timeout": "5s", "fetch_timeout": "5s",
               "retry_down": "2s"}
CLI_ENV = {"SHARDPACS_TIMEOUT_MS": "3000"}


# ---- waiting ------------------------------------------------------------------------

@pytest.fixture
def report(request, capsys):
    """say(text): prints a result line even under pytest -q (CTest's mode)."""
    def say(text):
        with capsys.disabled():
            print(f"\n  [{request.node.name}] {text}", end="", flush=True)
    yield say
    with capsys.disabled():
        print(flush=True)


# ---- the data -----------------------------------------------------------------------

class Data:
    """The bulk set, and per instance what a bit-preserving storescp received
    of it from storescu (the reference for every retrieved byte)."""

    def __init__(self, base: Path):
        bulk = gen.make_bulk_set(base / "bulk", small=SMALL, ct=CT, studies=STUDIES, seed=7)
        # one CT after every 25 small images, so large objects span the ingest
        small, ct = list(bulk.small_paths), list(bulk.ct_paths)
        self.paths = []
        while small or ct:
            self.paths += small[:25] + ct[:1]
            small, ct = small[25:], ct[1:]
        self.uid_of, self.study_of, self.series_of, self.is_ct = {}, {}, {}, {}
        for p in self.paths:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            self.uid_of[p] = uid
            self.study_of[uid] = str(ds.StudyInstanceUID)
            self.series_of[uid] = str(ds.SeriesInstanceUID)
            self.is_ct[uid] = p in bulk.ct_paths
        self.path_of = {u: p for p, u in self.uid_of.items()}
        self.studies = sorted(set(self.study_of.values()))
        scp = sc.Scp(base / "ref", "REF")
        try:
            sc.dcmtk(["storescu", "-aec", "REF", "127.0.0.1", scp.port, *self.paths],
                     timeout=120)
        finally:
            scp.stop()
        self.bytes = {u: gen.dataset_bytes_after_meta(f) for u, f in scp.files().items()}
        assert sorted(self.bytes) == sorted(self.path_of)
        self.total_bytes = sum(len(b) for b in self.bytes.values())

    def by_study(self, uids):
        out = collections.defaultdict(set)
        for u in uids:
            out[self.study_of[u]].add(u)
        return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return Data(tmp_path_factory.mktemp("data"))


# ---- ingest through the router --------------------------------------------------------

class Ingest(threading.Thread):
    """Sends paths to the router in batches (one `storescu -nh` per batch,
    each batch taking at least `pace` seconds) and records which C-STOREs
    were answered Success; a path not acknowledged is queued again, up to
    `attempts` times in all. Read the counters under `lock`."""

    def __init__(self, router, data, paths, batch=10, pace=0.25, attempts=4):
        super().__init__(daemon=True)
        self.router, self.data = router, data
        self.queue = collections.deque((p, 0) for p in paths)
        self.batch, self.pace, self.attempts = batch, pace, attempts
        self.lock = threading.Lock()
        self.acked = {}                        # SOP UID -> monotonic time of its Success
        self.statuses = collections.Counter()  # non-Success outcomes (status or 'none')
        self.sent = 0                          # C-STOREs tried (files handed to storescu)
        self.gave_up = set()
        self.halt = threading.Event()
        self.error = None
        self.t0 = self.t1 = None

    def run(self):
        self.t0 = time.monotonic()
        try:
            while self.queue and not self.halt.is_set():
                started = time.monotonic()
                batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
                try:
                    p = sc.dcmtk(["storescu", "-d", "-nh", "-to", "5", "-ta", "10", "-td", "30",
                                  "-aec", AE, "127.0.0.1", self.router.port,
                                  *[b[0] for b in batch]], check=False, timeout=120)
                    got = dict(sc.store_responses(p.out))
                except subprocess.TimeoutExpired:
                    got = {}
                now = time.monotonic()
                with self.lock:
                    for path, tries in batch:
                        uid = self.data.uid_of[path]
                        st = got.get(uid)
                        self.sent += 1
                        if st == 0:
                            self.acked.setdefault(uid, now)
                            continue
                        self.statuses["none" if st is None else hex(st)] += 1
                        if tries + 1 < self.attempts:
                            self.queue.append((path, tries + 1))
                        else:
                            self.gave_up.add(uid)
                rest = self.pace - (time.monotonic() - started)
                if rest > 0:
                    self.halt.wait(rest)
        except BaseException as e:  # reported by finish()
            self.error = e
        self.t1 = time.monotonic()

    def count(self):
        with self.lock:
            return len(self.acked)

    def acked_uids(self):
        with self.lock:
            return set(self.acked)

    def finish(self, timeout=180):
        """Waits for the whole set to be sent; returns the acknowledged UIDs."""
        self.join(timeout)
        assert not self.is_alive(), f"ingest still running after {timeout} s"
        if self.error:
            raise self.error
        return self.acked_uids()

    def summary(self):
        with self.lock:
            return (f"{self.sent} C-STOREs sent, {len(self.acked)} acknowledged"
                    + (f", not acknowledged: {dict(self.statuses)}" if self.statuses else "")
                    + (f", gave up on {len(self.gave_up)}" if self.gave_up else "")
                    + (f", {(self.t1 or time.monotonic()) - self.t0:.1f} s" if self.t0 else ""))


def ingest_all(router, data, paths=None):
    """Sends paths (default: the whole set) at full speed; returns the
    finished Ingest."""
    ing = Ingest(router, data, data.paths if paths is None else paths, batch=40, pace=0)
    ing.start()
    ing.finish()
    return ing


# ---- reading back -------------------------------------------------------------------

def get_study(router, study, out: Path):
    """getscu (bit-preserving) of one study; returns ({uid: path}, output)."""
    out.mkdir(parents=True, exist_ok=True)
    p = sc.dcmtk(["getscu", "-d", "+B", "-S", "-aec", AE, "-od", out,
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                  "127.0.0.1", router.port], check=False, timeout=120)
    files = {}
    for f in out.iterdir():
        files[str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID)] = f
    return files, p.out


def check_retrievable(router, data, uids, out: Path):
    """C-GETs every study of uids through the router; returns (retrieved,
    missing, differing): instances received, and those of uids missing or
    whose data set differs from what was stored."""
    retrieved, missing, bad = 0, [], []
    for i, (study, want) in enumerate(sorted(data.by_study(uids).items())):
        files, _ = get_study(router, study, out / f"s{i}")
        retrieved += len(files)
        for u in sorted(want):
            if u not in files:
                missing.append(u)
            elif gen.dataset_bytes_after_meta(files[u]) != data.bytes[u]:
                bad.append(u)
        for u, f in files.items():  # anything else returned must be intact too
            if u not in want and gen.dataset_bytes_after_meta(f) != data.bytes.get(u):
                bad.append(u)
    return retrieved, missing, bad


def assert_retrievable(router, data, uids, out: Path, say, when):
    t0 = time.monotonic()
    retrieved, missing, bad = check_retrievable(router, data, uids, out)
    say(f"{when}: {retrieved} retrieved by C-GET for {len(uids)} acknowledged "
        f"in {time.monotonic() - t0:.1f} s; missing {len(missing)}, differing {len(bad)}")
    assert not missing and not bad, (missing[:5], bad[:5])


def find_series(router, study, series, out: Path):
    """IMAGE-level C-FIND of one series; returns the SOP Instance UIDs."""
    status, rsps = find(router, out, "IMAGE", {"StudyInstanceUID": study,
                                              "SeriesInstanceUID": series,
                                              "SOPInstanceUID": ""})
    assert status == "Success", status
    return {r["SOPInstanceUID"] for r in rsps}


def find(router, out: Path, level, keys):
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rsp*.dcm"):
        f.unlink()
    args = ["findscu", "-v", "-S", "-aec", AE, "-X", "-od", out,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    p = sc.dcmtk(args + ["127.0.0.1", router.port], timeout=60)
    m = re.search(r"Received Final Find Response \(([^)]*)\)", p.out)
    assert m, p.out[-3000:]
    return m.group(1), gen.read_findscu_responses(out)


# ---- the cluster as it sees itself ------------------------------------------------------

class Healing:
    """A cluster (spcluster.Cluster with gossip and repair timings) plus the
    test's view of which nodes are paused or gone."""

    def __init__(self, root: Path, nodes=4, replicas=3, quorum=2, sites=None,
                 down_to_out="3s", scrub_interval="1h"):
        node_extra = (GOSSIP.format(down_to_out=down_to_out)
                      + REPAIR.format(scrub_interval=scrub_interval))
        router_extra = GOSSIP.format(down_to_out=down_to_out)
        self.c = sc.Cluster(root, nodes=nodes, replicas=replicas, quorum=quorum, sites=sites,
                            cluster_opts=ROUTER_OPTS, node_extra=node_extra,
                            router_extra=router_extra)
        self.replicas = replicas
        self.paused = set()
        self.gone = set()
        wait_for(self.all_alive, 30, "every node and the router alive in the view",
                 self.states)

    @property
    def router(self):
        return self.c.router

    def node(self, name):
        return self.c.node(name)

    def live(self):
        return [n for n in self.c.nodes
                if n.alive() and n.name not in self.paused and n.name not in self.gone]

    def cli(self, *args, via=None, check=True):
        """shardpacs CMD --connect (via, else the first live node) ARGS."""
        nodes = [via] if via else self.live()
        last = None
        for n in nodes:
            proc = sc.run_cli(args[0], "--connect", n.endpoint, "--server-key", n.pub,
                              "--key", self.c.admin_key, *args[1:], check=False,
                              timeout=20, env=CLI_ENV)
            if proc.returncode == 0 or not check:
                return proc
            last = proc
        raise AssertionError(f"shardpacs {args[0]}: no node answered: "
                             f"{last.stderr.decode(errors='replace') if last else 'none live'}")

    def status(self, via=None):
        return json.loads(self.cli("status", "--json", via=via).stdout)

    def states(self, via=None):
        try:
            return {m["id"]: m["state"] for m in self.status(via)["members"]}
        except AssertionError as e:
            return str(e)

    def all_alive(self):
        st = self.states()
        if not isinstance(st, dict):
            return False
        return (all(st.get(n.name) == "alive" for n in self.live())
                and all(st.get(r.name) == "alive" for r in self.c.routers))

    def seen_everywhere(self, name, states):
        """True when every live node's view has member `name` in one of states."""
        for n in self.live():
            view = self.states(via=n)
            if not isinstance(view, dict) or view.get(name) not in states:
                return False
        return True

    def healed(self):
        """The status when nothing is under-replicated and no hint is pending."""
        try:
            st = self.status()
        except AssertionError:
            return None
        if st["under_replicated_partitions"] == 0 and st["hints_pending"] == 0:
            return st
        return None

    def brief(self):
        try:
            st = self.status()
        except AssertionError as e:
            return str(e)
        return {"under_replicated": st["under_replicated_partitions"],
                "hints": st["hints_pending"], "repair": st["repair"],
                "members": {m["id"]: (m["state"], m.get("instances")) for m in st["members"]}}

    def locate(self, study):
        return json.loads(self.cli("locate", study, "--json").stdout)

    def holdings(self, studies):
        """{node: {study: {sop: (ts, size, digest)}}} of every live node."""
        return {n.name: {s: n.list_study(self.c.admin_key, s) for s in studies}
                for n in self.live()}

    def check_placement(self, data, acked):
        """Every study's N owners (locate) hold the same instances with the
        same digests, including every acknowledged one; no other node holds
        any of it (nothing duplicated, stand-ins handed off). Returns
        (distinct instances stored, instances held per node)."""
        hold = self.holdings(data.studies)
        acked_by_study = data.by_study(acked)
        distinct = 0
        for study in data.studies:
            owners = [r["id"] for r in self.locate(study)["replicas"]]
            assert len(owners) == self.replicas and len(set(owners)) == self.replicas, owners
            union = {}
            for n, per in hold.items():
                union.update(per[study])
            distinct += len(union)
            assert acked_by_study.get(study, set()) <= set(union), \
                (study, sorted(acked_by_study[study] - set(union))[:5])
            for n, per in hold.items():
                if n in owners:
                    assert per[study] == union, (study, n, len(per[study]), len(union))
                else:
                    assert per[study] == {}, (study, n, "holds what it does not own",
                                              len(per[study]))
        per_node = {n: sum(len(v) for v in per.values()) for n, per in hold.items()}
        return distinct, per_node

    def pause(self, name):
        self.node(name).pause()
        self.paused.add(name)

    def resume(self, name):
        self.node(name).resume()
        self.paused.discard(name)

    def stop(self):
        for name in list(self.paused):
            self.resume(name)
        return self.c.stop()


@pytest.fixture
def make(tmp_path):
    made = []

    def start(**kw):
        made.append(Healing(tmp_path / f"cluster{len(made) + 1}", **kw))
        return made[-1]

    yield start
    for h in made:
        h.stop()


# ---- a. kill -9 during ingest -------------------------------------------------------------

def test_killed_node_is_re_replicated_during_ingest(make, data, tmp_path, report):
    """4 nodes, N=3, W=2: a node killed in the middle of an ingest; the ingest
    goes on, the dead node goes out and its partitions are copied to their
    new owners until nothing is under-replicated; every acknowledged
    instance is retrievable; after a second node is killed too."""
    h = make(nodes=4)
    ing = Ingest(h.router, data, data.paths, batch=10, pace=0.3)
    ing.start()
    wait_for(lambda: ing.count() >= len(data.paths) // 3, 120, "a third acknowledged",
             ing.summary)
    victim = h.node("n3")
    t_kill = time.monotonic()
    victim.kill9()
    h.gone.add("n3")
    at_kill = ing.count()
    t_out = wait_for(lambda: h.seen_everywhere("n3", ("out",)) and time.monotonic(), 60,
                     "every live node to see n3 out", h.brief)
    acked = ing.finish()
    report(f"ingest: {ing.summary()}; {at_kill} acknowledged before the kill, "
           f"{len(acked) - at_kill} after")
    assert len(acked) > at_kill, "the ingest stopped with the node"
    st = wait_for(h.healed, 90, "no under-replicated partition, no pending hint", h.brief)
    t_full = time.monotonic()
    report(f"n3 out {t_out - t_kill:.1f} s after kill -9; full replication "
           f"{t_full - t_kill:.1f} s after the kill ({st['partitions_with_data']} partitions with data, "
           f"repair {st['repair']['bytes_done'] / 1e6:.1f} MB copied)")
    distinct, per_node = h.check_placement(data, acked)
    report(f"{distinct} distinct instances stored; per node {per_node}")
    assert sum(per_node.values()) == 3 * distinct
    assert_retrievable(h.router, data, acked, tmp_path / "get1", report, "after healing")

    h.node("n2").kill9()
    h.gone.add("n2")
    assert_retrievable(h.router, data, acked, tmp_path / "get2", report,
                       "at once after n2 was killed too")


# ---- b. SIGSTOP / SIGCONT ---------------------------------------------------------------

def test_paused_node_refutes_and_catches_up(make, data, tmp_path, report):
    """A node paused (SIGSTOP) during an ingest for longer than the suspicion
    timeout is seen down (not out: the out delay is long here); writes go
    to stand-ins. After SIGCONT it refutes with a higher incarnation, gets
    what was written meanwhile, the stand-ins hand off and delete: every
    owner holds every instance exactly once, no one else holds any."""
    h = make(nodes=4, down_to_out="60s")
    ing = Ingest(h.router, data, data.paths, batch=10, pace=0.3)
    ing.start()
    wait_for(lambda: ing.count() >= len(data.paths) // 4, 120, "a quarter acknowledged",
             ing.summary)
    inc0 = next(m for m in h.status()["members"] if m["id"] == "n2")["incarnation"]
    before = ing.acked_uids()
    t_stop = time.monotonic()
    h.pause("n2")
    wait_for(lambda: h.seen_everywhere("n2", ("down",)), 30, "n2 down everywhere", h.brief)
    t_down = time.monotonic()
    time.sleep(1.0)  # a little longer down: more writes go to stand-ins
    during = ing.acked_uids() - before
    h.resume("n2")
    t_cont = time.monotonic()
    wait_for(lambda: h.seen_everywhere("n2", ("alive",)), 30, "n2 alive again everywhere",
             h.brief)
    t_alive = time.monotonic()
    inc1 = next(m for m in h.status()["members"] if m["id"] == "n2")["incarnation"]
    acked = ing.finish()
    report(f"ingest: {ing.summary()}; {len(during)} acknowledged while n2 was stopped")
    report(f"n2 down {t_down - t_stop:.1f} s after SIGSTOP, alive {t_alive - t_cont:.1f} s "
           f"after SIGCONT (incarnation {inc0} -> {inc1})")
    assert inc1 > inc0, "n2 came back without refuting"
    assert during, "nothing was written while n2 was stopped"
    st = wait_for(h.healed, 90, "no under-replicated partition, no pending hint", h.brief)
    report(f"hints delivered and full replication {time.monotonic() - t_cont:.1f} s after "
           f"SIGCONT ({st['repair']['bytes_done'] / 1e6:.1f} MB copied)")
    distinct, per_node = h.check_placement(data, acked)
    report(f"{distinct} distinct instances; per node {per_node}")
    assert sum(per_node.values()) == 3 * distinct
    # what n2 owns of what was written while it was stopped, it now holds
    n2 = h.node("n2")
    owned = 0
    for study, uids in data.by_study(during).items():
        if "n2" in [r["id"] for r in h.locate(study)["replicas"]]:
            held = n2.list_study(h.c.admin_key, study)
            assert uids <= set(held), (study, sorted(uids - set(held))[:5])
            owned += len(uids)
    report(f"n2 received {owned} instances written while it was stopped")
    assert owned > 0
    assert_retrievable(h.router, data, acked, tmp_path / "get", report, "at the end")


# ---- c. a fifth node joins during ingest ----------------------------------------------------

class Reader(threading.Thread):
    """Round-robin over the studies while partitions move: an IMAGE-level
    C-FIND of each series and a C-GET of the study, each of which must
    return every instance acknowledged before it started (bit-exact for the
    C-GET)."""

    def __init__(self, h, data, ing, out: Path):
        super().__init__(daemon=True)
        self.h, self.data, self.ing, self.out = h, data, ing, out
        self.halt = threading.Event()
        self.finds = self.gets = self.checked = 0
        self.misses = []
        self.error = None

    def run(self):
        try:
            i = 0
            while not self.halt.is_set():
                study = self.data.studies[i % len(self.data.studies)]
                want = self.data.by_study(self.ing.acked_uids()).get(study, set())
                series = collections.defaultdict(set)
                for u in want:
                    series[self.data.series_of[u]].add(u)
                for se, uids in sorted(series.items()):
                    got = find_series(self.h.router, study, se, self.out / "find")
                    self.finds += 1
                    self.misses += [("C-FIND", u) for u in uids - got]
                files, _ = get_study(self.h.router, study, self.out / f"get{i}")
                self.gets += 1
                for u in want:
                    if u not in files:
                        self.misses.append(("C-GET", u))
                    elif gen.dataset_bytes_after_meta(files[u]) != self.data.bytes[u]:
                        self.misses.append(("C-GET differs", u))
                self.checked += len(want)
                for f in files.values():
                    f.unlink()
                i += 1
        except BaseException as e:
            self.error = e

    def finish(self):
        self.halt.set()
        self.join(180)
        assert not self.is_alive()
        if self.error:
            raise self.error


def test_added_node_takes_partitions_without_a_gap(make, data, tmp_path, report):
    """A fifth node added during an ingest: partitions move to it; C-FIND
    and C-GET in a loop during the move never miss an acknowledged
    instance; at the end it owns partitions and holds instances, nothing is
    under-replicated and the previous owners deleted what moved."""
    h = make(nodes=4)
    ing = Ingest(h.router, data, data.paths, batch=10, pace=0.3)
    ing.start()
    wait_for(lambda: ing.count() >= len(data.paths) // 3, 120, "a third acknowledged",
             ing.summary)
    reader = Reader(h, data, ing, tmp_path / "reader")
    reader.start()
    t_add = time.monotonic()
    n5 = h.c.add_node()
    assert n5.name == "n5"
    wait_for(lambda: h.seen_everywhere("n5", ("alive",)), 90, "n5 alive everywhere", h.brief)
    t_alive = time.monotonic()
    acked = ing.finish()
    st = wait_for(h.healed, 120, "no under-replicated partition, no pending hint", h.brief)
    t_done = time.monotonic()
    rounds = reader.gets
    wait_for(lambda: reader.gets >= rounds + len(data.studies) or reader.error, 120,
             "one more round of reads over every study")
    reader.finish()
    report(f"ingest: {ing.summary()}")
    report(f"n5 alive {t_alive - t_add:.1f} s after start, moves done {t_done - t_add:.1f} s "
           f"after ({st['repair']['bytes_done'] / 1e6:.1f} MB copied); reads during the move: "
           f"{reader.finds} C-FIND, {reader.gets} C-GET, {reader.checked} instances checked, "
           f"{len(reader.misses)} missed")
    assert not reader.misses, reader.misses[:10]
    m5 = next(m for m in st["members"] if m["id"] == "n5")
    assert m5["partitions_owned"] > 0 and m5["instances"] > 0, m5
    distinct, per_node = h.check_placement(data, acked)
    report(f"{distinct} distinct instances; per node {per_node}")
    assert per_node["n5"] > 0
    assert sum(per_node.values()) == 3 * distinct
    assert_retrievable(h.router, data, acked, tmp_path / "get", report, "at the end")


# ---- d. drain -------------------------------------------------------------------------------

def test_drained_node_leaves_with_full_replication(make, data, tmp_path, report):
    """`shardpacs drain n4` while an ingest goes on: n4 streams its data to the
    new owners, is LEFT and its process exits 0 by itself; nothing is
    under-replicated and everything is retrievable."""
    h = make(nodes=4)
    half = len(data.paths) // 2
    first = ingest_all(h.router, data, data.paths[:half])
    ing = Ingest(h.router, data, data.paths[half:], batch=10, pace=0.2)
    ing.start()
    wait_for(lambda: ing.count() >= 20, 60, "the second half to start", ing.summary)
    n4 = h.node("n4")
    t0 = time.monotonic()
    proc = h.cli("drain", "n4", via=h.node("n1"), check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    try:
        rc = n4.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"n4 still running 120 s after drain: {h.brief()}")
    t_exit = time.monotonic()
    h.gone.add("n4")
    assert rc == 0, f"n4 exited {rc}: {n4.log.read_text(errors='replace')[-3000:]}"
    wait_for(lambda: h.states().get("n4") == "left", 20, "n4 left in the view", h.brief)
    acked = first.acked_uids() | ing.finish()
    st = wait_for(h.healed, 90, "no under-replicated partition, no pending hint", h.brief)
    report(f"ingest: {first.summary()} before, {ing.summary()} during the drain")
    report(f"n4 exited 0 {t_exit - t0:.1f} s after drain; full replication "
           f"{time.monotonic() - t0:.1f} s after ({st['repair']['bytes_done'] / 1e6:.1f} MB "
           f"copied)")
    distinct, per_node = h.check_placement(data, acked)
    report(f"{distinct} distinct instances; per node {per_node}")
    assert "n4" not in per_node and sum(per_node.values()) == 3 * distinct
    assert_retrievable(h.router, data, acked, tmp_path / "get", report, "at the end")


# ---- e. a corrupt replica ---------------------------------------------------------------------

def pixel_offset(ds_bytes):
    """Offset of the Pixel Data value in explicit VR little endian data set bytes."""
    i = ds_bytes.find(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert i >= 0
    return i + 12


def flip_in_blob_files(data_dir: Path, needle: bytes):
    """Flips one byte inside every occurrence of needle in the node's blob
    files; returns [(file, offset)] changed."""
    hits = []
    for f in sorted(data_dir.rglob("*.blob")):
        raw = bytearray(f.read_bytes())
        at = raw.find(needle)
        while at >= 0:
            raw[at + 6] ^= 0xFF  # inside the instance's own first pixels
            hits.append((f.name, at))
            at = raw.find(needle, at + 1)
        if any(h[0] == f.name for h in hits):
            f.write_bytes(bytes(raw))
    return hits


def test_corrupt_replica_is_repaired(make, data, tmp_path, report):
    """One replica of a large object is corrupted in its RocksDB blob file
    while its node is stopped; after the restart the scrubber (or a read)
    finds it and replaces it from a good replica: the node returns the
    original bytes again and counts the repair."""
    h = make(nodes=3, scrub_interval="1s")
    ing = ingest_all(h.router, data, [p for p in data.paths if data.is_ct[data.uid_of[p]]]
                     + data.paths[:30])
    acked = ing.acked_uids()
    wait_for(h.healed, 60, "full replication", h.brief)
    uid = next(u for u in sorted(acked) if data.is_ct[u])
    good = tmp_path / "good.dcm"
    h.node("n1").cli(h.c.admin_key, "get", uid, good)
    assert gen.dataset_bytes_after_meta(good) == data.bytes[uid]
    victim = h.node("n2")
    ds = data.bytes[uid]
    needle = ds[pixel_offset(ds):pixel_offset(ds) + 64]
    assert victim.stop() == 0
    hits = flip_in_blob_files(victim.dir / "data", needle)
    if not hits:  # still only in the WAL: a start replays and flushes it into a blob file
        victim.restart()
        assert victim.stop() == 0
        hits = flip_in_blob_files(victim.dir / "data", needle)
    assert hits, "the object's bytes are in no blob file of n2"
    t0 = time.monotonic()
    victim.restart()
    out = tmp_path / "after.dcm"

    def intact():
        if out.exists():
            out.unlink()
        p = victim.cli(h.c.admin_key, "get", uid, out, check=False, env=CLI_ENV)
        return p.returncode == 0 and out.read_bytes() == good.read_bytes()
    wait_for(intact, 60, f"n2 to return {uid} intact again")
    t_fixed = time.monotonic()
    m2 = wait_for(lambda: next((m for m in h.status()["members"]
                                if m["id"] == "n2" and m["repaired"] >= 1), None), 30,
                  "n2 to count a repair", h.brief)
    report(f"corrupted {uid} in {hits}; n2 returns it intact {t_fixed - t0:.1f} s after its "
           f"restart (scrub_checked {m2['scrub_checked']}, scrub_corrupt "
           f"{m2['scrub_corrupt']}, repaired {m2['repaired']})")
    assert_retrievable(h.router, data, acked, tmp_path / "get", report, "at the end")


# ---- f. two sites ---------------------------------------------------------------------------

def test_every_study_survives_the_loss_of_a_site(make, data, tmp_path, report):
    """Sites A,A,B,B with N=3: every study has replicas at both sites; with
    both site-B nodes stopped (SIGSTOP) every study is still found and
    retrieved through the router, and the cluster does not mark the whole
    site out."""
    h = make(nodes=4, sites=["A", "A", "B", "B"])
    ing = ingest_all(h.router, data)
    acked = ing.acked_uids()
    report(f"ingest: {ing.summary()}")
    wait_for(h.healed, 60, "full replication", h.brief)
    for study in data.studies:
        reps = h.locate(study)["replicas"]
        sites = collections.Counter(r["site"] for r in reps)
        assert set(sites) == {"A", "B"} and max(sites.values()) <= 2, (study, reps)
    t0 = time.monotonic()
    h.pause("n3")
    h.pause("n4")
    status, rsps = find(h.router, tmp_path / "find", "STUDY", {"StudyInstanceUID": ""})
    found = {r["StudyInstanceUID"] for r in rsps}
    report(f"site B stopped: C-FIND found {len(found)} of {len(data.studies)} studies "
           f"({status}) {time.monotonic() - t0:.1f} s after")
    assert set(data.by_study(acked)) <= found
    assert_retrievable(h.router, data, acked, tmp_path / "get", report, "with site B stopped")
    wait_for(lambda: time.monotonic() - t0 > 5, 10, "past the out delay")
    states = h.states()
    report(f"states {time.monotonic() - t0:.1f} s after site B stopped: {states}")
    assert not (states.get("n3") == "out" and states.get("n4") == "out"), states
