"""Multi-host fault tests, checked like Jepsen: every storage node, router and
site's DICOM clients run in their own network namespace with their own
address (tests/cluster/netns.py: veth pairs to per-site bridges in a switch
namespace, a user-space WAN delay line between sites), and the network is
cut under a running cluster: a node isolated while its process runs, two
sites split with routers taking writes on both sides, a one-way partition,
a flapping link, 40 ms +- 10 ms and 1 % loss between sites, a router cut off
from half the nodes, a partition during a drain and during a join.

Clients (storescu in each site's client namespace, through that site's
router) record every C-STORE and its status (`storescu -d`, parsed with
spcluster.store_responses). While the fault is still on, every instance
acknowledged so far must be on at least W nodes (the router answers Success
only with W durable copies). After the faults heal, the checker requires:
nothing under-replicated and no hint pending (`shardpacs status --json`,
asked at a node of every site), every acknowledged instance on N nodes with
one digest, every acknowledged instance retrieved bit-exact (C-GET through
each site's router from that site's client namespace, the data set after
the meta header compared with what a bit-preserving storescp received from
the same storescu), and no SOP conflict on any node (the clients never send
one SOP Instance UID with two contents). Each scenario prints one line:
scenario, instances acknowledged, acknowledged but lost, time to heal.

Skipped where network namespaces cannot be made (not root, no iproute2 or
iptables). Every namespace is deleted at the end of each test, its
processes killed, even on failure.

Run: /usr/bin/python3 -m pytest -q -s tests/cluster/test_partitions.py
"""
import collections
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import netns  # noqa: E402
import spcluster as sc  # noqa: E402
from spcluster import wait_until  # noqa: E402

_why = netns.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no network namespaces: {_why}")

AE = "SHARDPACS"
PER_SCENARIO = 30   # tiny instances per scenario (64x64 CT, ~10 KB)
STUDIES = 4
GOSSIP = {"gossip": {"probe_interval": "200ms", "probe_timeout": "100ms",
                     "suspicion_mult": "3", "suspicion_max_mult": "2",
                     "sync_interval": "1s", "down_to_out": "10m"}}
REPAIR = {"repair": {"interval": "1s", "rate": "0", "streams": "2"}}
ROUTER_OPTS = {"store_timeout": "3s", "query_timeout": "5s", "fetch_timeout": "5s",
               "retry_down": "2s"}
CLI_ENV = {"SHARDPACS_TIMEOUT_MS": "3000"}
HEAL_TIMEOUT = 90


@pytest.fixture
def say(request, capsys):
    """say(text): prints a result line even under pytest -q (CTest's mode)."""
    def out(text):
        with capsys.disabled():
            print(f"\n  [{request.node.name}] {text}", end="", flush=True)
    yield out
    with capsys.disabled():
        print(flush=True)


# ---- the data: a separate slice of tiny instances per scenario ---------------------------

class Data:
    """Tiny CT instances (one bulk set, sliced per scenario) and what a
    bit-preserving storescp received of each from storescu (the reference)."""

    def __init__(self, base: Path, count):
        bulk = gen.make_bulk_set(base / "bulk", small=count, ct=0, studies=count // 8, seed=14)
        self.paths = list(bulk.small_paths)
        self.uid_of, self.study_of = {}, {}
        for p in self.paths:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            self.uid_of[p] = str(ds.SOPInstanceUID)
            self.study_of[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
        scp = sc.Scp(base / "ref", "REF")
        try:
            for i in range(0, len(self.paths), 100):
                sc.dcmtk(["storescu", "-aec", "REF", "127.0.0.1", scp.port,
                          *self.paths[i:i + 100]], timeout=120)
        finally:
            scp.stop()
        self.bytes = {u: gen.dataset_bytes_after_meta(f) for u, f in scp.files().items()}
        assert len(self.bytes) == len(self.paths)
        self.next = 0

    def take(self, n):
        """The next n paths, never given out before (no scenario sends
        another's instances), over a few studies."""
        out = self.paths[self.next:self.next + n]
        self.next += n
        assert len(out) == n, "the data set is too small for the scenarios"
        return out

    def by_study(self, uids):
        out = collections.defaultdict(set)
        for u in uids:
            out[self.study_of[u]].add(u)
        return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return Data(tmp_path_factory.mktemp("data"), PER_SCENARIO * 12)


# ---- a cluster over namespaces ----------------------------------------------------------

class Sim:
    """A network (netns.Net), a cluster whose every node and router has its
    own host on its site, and one client host per site."""

    def __init__(self, root: Path, node_sites, router_sites, replicas=3, quorum=2,
                 down_to_out="10m", gossip=None):
        self.net = netns.Net()
        try:
            self.clients = {}
            for site in dict.fromkeys(list(node_sites) + list(router_sites)):
                self.clients[site] = self.net.add_host(f"c{site}", site)

            def hosts(name, site):
                h = self.net.add_host(name, site)
                return h.prefix, h.addr
            gossip = sc.merge_ini(GOSSIP, {"gossip": {"down_to_out": down_to_out,
                                                      **(gossip or {})}})
            self.c = sc.Cluster(root, nodes=len(node_sites), replicas=replicas, quorum=quorum,
                                routers=len(router_sites), sites=list(node_sites),
                                router_sites=list(router_sites), hosts=hosts,
                                cluster_opts=ROUTER_OPTS, node_extra=sc.merge_ini(gossip, REPAIR),
                                router_extra=gossip)
        except BaseException:
            self.net.close()
            raise
        self.replicas, self.quorum = replicas, quorum

    def close(self):
        try:
            self.c.stop()
        finally:
            self.net.close()

    def host(self, name):
        return self.net.hosts[name]

    def router_of(self, site):
        return next(r for r in self.c.routers if r.site == site)

    def running(self):
        return [n for n in self.c.nodes if n.alive()]

    def status(self, node):
        """`shardpacs status --json` asked at `node` (from its own host)."""
        p = sc.run_cli("status", "--connect", node.endpoint, "--server-key", node.pub,
                       "--key", self.c.admin_key, "--json", check=False, timeout=20,
                       env=CLI_ENV, prefix=node.prefix)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)

    def healed(self):
        """True when a running node of every site reports nothing
        under-replicated and no pending hint."""
        seen = {}
        for n in self.running():
            if n.site in seen:
                continue
            st = self.status(n)
            if st is None or st["under_replicated_partitions"] or st["hints_pending"]:
                return False
            seen[n.site] = True
        return bool(seen)

    def brief(self):
        out = {}
        for n in self.running():
            st = self.status(n)
            out[n.name] = None if st is None else (
                st["under_replicated_partitions"], st["hints_pending"],
                {m["id"]: m["state"] for m in st["members"]})
        return out

    def copies(self, data, uids):
        """{uid: (holders, distinct digests)} over every running node, each
        asked from its own host (so a cut-off node answers too)."""
        held = collections.defaultdict(list)
        for study in data.by_study(uids):
            for n in self.running():
                for sop, (_, _, digest) in n.list_study(self.c.admin_key, study).items():
                    held[sop].append(digest)
        return {u: (len(held[u]), len(set(held[u]))) for u in uids}


@pytest.fixture
def make(tmp_path):
    made = []

    def start(*a, **kw):
        made.append(Sim(tmp_path / f"sim{len(made) + 1}", *a, **kw))
        return made[-1]
    try:
        yield start
    finally:
        for s in made:
            s.close()
        netns.reap_stale()


# ---- clients ------------------------------------------------------------------------------

class Writer(threading.Thread):
    """storescu in a site's client host sending paths to a router in batches
    (a new association per batch, each batch taking at least `pace` s),
    recording every C-STORE response; a path not acknowledged is sent again
    (as a modality would) up to `attempts` times. Bounded: gives up at
    `limit` seconds."""

    def __init__(self, sim, site, paths, data, batch=3, pace=0.4, attempts=3, limit=60,
                 router=None):
        super().__init__(daemon=True)
        self.client = sim.clients[site]
        self.router = router or sim.router_of(site)
        self.data = data
        self.queue = collections.deque((p, 0) for p in paths)
        self.batch, self.pace, self.attempts, self.limit = batch, pace, attempts, limit
        self.lock = threading.Lock()
        self.history = []      # (monotonic time, SOP UID, status or None)
        self.acked = {}        # SOP UID -> time of its first Success
        self.error = None
        self.halt = threading.Event()

    def run(self):
        t0 = time.monotonic()
        try:
            while self.queue and not self.halt.is_set() and time.monotonic() - t0 < self.limit:
                started = time.monotonic()
                batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
                try:
                    p = sc.dcmtk([*self.client.prefix, "storescu", "-d", "-nh", "-to", "5",
                                  "-ta", "10", "-td", "10", "-aec", AE, self.router.addr,
                                  self.router.port, *[b[0] for b in batch]],
                                 check=False, timeout=60)
                    got = dict(sc.store_responses(p.out))
                except subprocess.TimeoutExpired:
                    got = {}
                now = time.monotonic()
                with self.lock:
                    for path, tries in batch:
                        uid = self.data.uid_of[path]
                        st = got.get(uid)
                        self.history.append((now, uid, st))
                        if st == 0:
                            self.acked.setdefault(uid, now)
                        elif tries + 1 < self.attempts:
                            self.queue.append((path, tries + 1))
                rest = self.pace - (time.monotonic() - started)
                if rest > 0:
                    self.halt.wait(rest)
        except BaseException as e:
            self.error = e

    def acked_uids(self):
        with self.lock:
            return set(self.acked)

    def failures(self):
        with self.lock:
            return collections.Counter("none" if st is None else hex(st)
                                       for _, _, st in self.history if st != 0)

    def finish(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive(), "writer still running"
        if self.error:
            raise self.error
        return self.acked_uids()


def run_writers(sim, data, plan, **kw):
    """Starts a Writer per (site, n) in plan; returns them."""
    ws = [Writer(sim, site, data.take(n), data, **kw) for site, n in plan]
    for w in ws:
        w.start()
    return ws


# ---- the checker ---------------------------------------------------------------------------

def get_study(sim, site, study, out: Path):
    """C-GET of one study through the site's router from its client host;
    returns {uid: path}."""
    out.mkdir(parents=True, exist_ok=True)
    r, client = sim.router_of(site), sim.clients[site]
    sc.dcmtk([*client.prefix, "getscu", "+B", "-S", "-aec", AE, "-od", out,
              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
              r.addr, r.port], check=False, timeout=60)
    return {str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): f
            for f in out.iterdir()}


def check_durable_now(sim, data, acked, say, when):
    """Every acknowledged instance is already on at least W nodes with one
    digest (asked while the fault is still on)."""
    cp = sim.copies(data, acked)
    short = sorted(u for u, (n, d) in cp.items() if n < sim.quorum)
    split = sorted(u for u, (n, d) in cp.items() if d > 1)
    say(f"{when}: {len(acked)} acknowledged, fewest copies "
        f"{min((n for n, _ in cp.values()), default=0)}, under W: {len(short)}")
    assert not short, f"acknowledged with fewer than W={sim.quorum} copies: {short[:5]}"
    assert not split, f"copies that differ: {split[:5]}"


def check(sim, data, writers, name, t_heal, say, out: Path):
    """The end of every scenario (faults healed at t_heal): replication
    restored, every acknowledged instance on N nodes and retrievable
    bit-exact from every site, no conflict. Prints the scenario's line."""
    acked = set()
    for w in writers:
        acked |= w.finish()
    healed = False
    try:
        wait_until(sim.healed, HEAL_TIMEOUT, "nothing under-replicated", sim.brief)
        healed = True
    finally:
        t_healed = time.monotonic() - t_heal
        lost = set()
        bad = set()
        sites = sorted({r.site for r in sim.c.routers})
        if acked:
            for site in sites:
                for i, (study, want) in enumerate(sorted(data.by_study(acked).items())):
                    files = get_study(sim, site, study, out / f"{site}{i}")
                    for u in want:
                        if u not in files:
                            lost.add(u)
                        elif gen.dataset_bytes_after_meta(files[u]) != data.bytes[u]:
                            bad.add(u)
        failed = collections.Counter()
        for w in writers:
            failed.update(w.failures())
        say(f"{name}: {len(acked)} acknowledged, {len(lost)} acknowledged but lost, "
            f"{len(bad)} differing, " + (f"healed in {t_healed:.1f} s" if healed else
                                        f"NOT healed after {t_healed:.1f} s")
            + (f"; not acknowledged: {dict(failed)}" if failed else ""))
    assert acked, "nothing was acknowledged"
    assert not lost and not bad, (sorted(lost)[:5], sorted(bad)[:5])
    cp = sim.copies(data, acked)
    under = sorted(u for u, (n, d) in cp.items() if n < sim.replicas or d > 1)
    assert not under, f"acknowledged instances not on N nodes with one digest: {under[:5]}"
    conflicts = {n.name: n.stats(sim.c.admin_key)["conflicts"] for n in sim.running()}
    assert not any(conflicts.values()), f"conflicts the clients did not cause: {conflicts}"
    return acked


# ---- scenarios -----------------------------------------------------------------------------

def test_isolated_node(make, data, tmp_path, say):
    """One node of four cut from every other host while its process runs,
    in the middle of an ingest: the router still answers Success only with
    W copies (stand-ins take the cut node's share), and after the heal the
    node rejoins and everything converges."""
    sim = make(["A"] * 4, ["A"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO)])
    wait_until(lambda: len(ws[0].acked_uids()) >= 6, 60, "first acknowledgements")
    sim.net.isolate("n2")
    time.sleep(6)
    check_durable_now(sim, data, ws[0].acked_uids(), say, "n2 isolated")
    t = time.monotonic()
    sim.net.heal()
    check(sim, data, ws, "isolated node", t, say, tmp_path / "get")


def test_two_sites_split(make, data, tmp_path, say):
    """Sites A (n1, n2, router1) and B (n3, n4, router2) split in two while
    clients write at both sites; each router must acknowledge only with W
    copies on its side; after the heal every instance is at both sites."""
    sim = make(["A", "A", "B", "B"], ["A", "B"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO // 2), ("B", PER_SCENARIO // 2)])
    wait_until(lambda: all(len(w.acked_uids()) >= 3 for w in ws), 60, "first acks")
    sim.net.partition("A", "B")
    time.sleep(8)
    check_durable_now(sim, data, ws[0].acked_uids() | ws[1].acked_uids(), say, "split")
    t = time.monotonic()
    sim.net.heal()
    check(sim, data, ws, "two sites split", t, say, tmp_path / "get")


def test_one_way_partition(make, data, tmp_path, say):
    """Packets from site A to site B are lost, B to A still arrive, while
    clients write at both sites."""
    sim = make(["A", "A", "B", "B"], ["A", "B"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO // 2), ("B", PER_SCENARIO // 2)])
    wait_until(lambda: all(len(w.acked_uids()) >= 3 for w in ws), 60, "first acks")
    sim.net.cut("A", "B")
    time.sleep(8)
    check_durable_now(sim, data, ws[0].acked_uids() | ws[1].acked_uids(), say, "A->B cut")
    t = time.monotonic()
    sim.net.heal()
    check(sim, data, ws, "one-way partition", t, say, tmp_path / "get")


def test_flapping_link(make, data, tmp_path, say):
    """A node's link goes down and up every 2 s for 12 s during an ingest."""
    sim = make(["A"] * 4, ["A"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO)])
    wait_until(lambda: len(ws[0].acked_uids()) >= 3, 60, "first acknowledgements")
    for _ in range(3):
        sim.net.link("n3", False)
        time.sleep(2)
        sim.net.link("n3", True)
        time.sleep(2)
    check_durable_now(sim, data, ws[0].acked_uids(), say, "after flapping")
    t = time.monotonic()
    sim.net.heal()
    check(sim, data, ws, "flapping link", t, say, tmp_path / "get")


def test_wan_latency_and_loss(make, data, tmp_path, say):
    """40 ms +- 10 ms and 1 % loss between two sites during ingest at both.
    Probes must wait longer than the sites' round trip (80 ms +- 20 ms, and
    a lost packet's retransmission): with the 100 ms probe timeout of the
    other scenarios each site soon has the other down and the cluster
    stays split for as long as the WAN is that slow (found by this test)."""
    sim = make(["A", "A", "B", "B"], ["A", "B"],
               gossip={"probe_interval": "1s", "probe_timeout": "500ms"})
    sim.net.wan("A", "B", delay_ms=40, jitter_ms=10, loss=0.01)
    ws = run_writers(sim, data, [("A", PER_SCENARIO // 2), ("B", PER_SCENARIO // 2)])
    for w in ws:
        w.finish()
    check_durable_now(sim, data, ws[0].acked_uids() | ws[1].acked_uids(), say, "over the WAN")
    st = sim.net.wan_stats()
    say(f"WAN: {st['forwarded']} packets forwarded, {st['dropped']} dropped")
    check(sim, data, ws, "WAN 40+-10 ms 1% loss", time.monotonic(), say, tmp_path / "get")


def test_router_cut_from_half_the_nodes(make, data, tmp_path, say):
    """The router cannot reach n1 and n2 while the nodes still reach each
    other, so gossip (indirect probes) keeps calling n1 and n2 alive: the
    router must answer Success only with W copies, on the nodes it reaches,
    and (regression) must keep taking writes through stand-ins instead of
    failing every put that counts on an owner it cannot reach once its
    short avoidance (retry_down) ran out."""
    sim = make(["A"] * 4, ["A"])
    sim.net.partition("router1", ["n1", "n2"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO)], limit=40)
    for w in ws:
        w.finish()
    check_durable_now(sim, data, ws[0].acked_uids(), say, "router cut from n1, n2")
    assert len(ws[0].acked_uids()) == PER_SCENARIO, \
        f"writes failed with two nodes reachable: {dict(ws[0].failures())}"
    t = time.monotonic()
    sim.net.heal()
    check(sim, data, ws, "router cut from half the nodes", t, say, tmp_path / "get")


def test_partition_during_drain(make, data, tmp_path, say):
    """n5 drains while it is cut from n1 and n2 for 5 s; it still leaves
    (exit 0) only once every owner holds its data."""
    sim = make(["A"] * 5, ["A"])
    first = run_writers(sim, data, [("A", PER_SCENARIO // 2)], batch=8, pace=0)
    first[0].finish()
    n5 = sim.c.node("n5")
    p = sc.run_cli(
        "drain", "--connect", n5.endpoint, "--server-key", n5.pub, "--key", sim.c.admin_key,
        "n5", check=False, env=CLI_ENV, prefix=n5.prefix)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    sim.net.partition("n5", ["n1", "n2"])
    ws = run_writers(sim, data, [("A", PER_SCENARIO // 2)])
    time.sleep(5)
    t = time.monotonic()
    sim.net.heal()
    try:
        rc = n5.proc.wait(timeout=HEAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"n5 still running after the drain: {sim.brief()}")
    assert rc == 0, n5.log_text()[-3000:]
    check(sim, data, first + ws, "partition during drain", t, say, tmp_path / "get")


def test_partition_during_join(make, data, tmp_path, say):
    """n5 joins while an ingest runs and is cut from n1 and n2 for 5 s
    during its fill; it ends alive, owning and holding its share."""
    sim = make(["A"] * 4, ["A"])
    first = run_writers(sim, data, [("A", PER_SCENARIO // 2)], batch=8, pace=0)
    first[0].finish()
    ws = run_writers(sim, data, [("A", PER_SCENARIO // 2)])
    n5 = sim.c.add_node(site="A")
    sim.net.partition("n5", ["n1", "n2"])
    time.sleep(5)
    t = time.monotonic()
    sim.net.heal()
    sim.c.wait_member("n5", "alive", timeout=HEAL_TIMEOUT)
    check(sim, data, first + ws, "partition during join", t, say, tmp_path / "get")
    assert n5.stats(sim.c.admin_key)["instances"] > 0
