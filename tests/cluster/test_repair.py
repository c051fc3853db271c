"""Process-level tests of the storage nodes' self-healing without a router:
anti-entropy filling replicas that missed writes, a restarted node catching
up (JOINING, then ALIVE), hand-off of data a node holds but does not own
(deleted only once every owner holds it), the drain refusal rule, and the
status / locate answers of the admin CLI. Objects are put straight into one
node with `shardpacs node put`; the nodes' healers do the rest. Timings are
short: gossip probe 200 ms, repair rounds every 300 ms."""
import json
import os
import re
import time

import pytest

from spcluster import Node, keygen, run_cli, wait_until as wait_for

TIMINGS = ("[gossip]\nprobe_interval = 200ms\nprobe_timeout = 100ms\nsuspicion_mult = 3\n"
           "suspicion_max_mult = 2\nsync_interval = 1s\ndown_to_out = 10m\n"
           "[repair]\ninterval = 300ms\nrate = 0\nstreams = 2\nscrub_interval = 1h\n")
ROOT = "1.2.826.0.1.3680043.8.498.77"


class Nodes:
    """n1..nK gossiping through n1, N replicas, plus an operator key."""

    def __init__(self, root, count, replicas):
        self.root = root
        self.keys = root / "cluster.keys"
        self.keys.write_text("")
        self.admin = root / "admin.key"
        admin_pub = keygen(self.admin)
        self.nodes = [Node(root, f"n{i + 1}", self.keys, extra=TIMINGS) for i in range(count)]
        self.keys.write_text("".join(f"{n.public} {n.name}\n" for n in self.nodes)
                             + f"{admin_pub} admin\n")
        self.nodes[0].start()
        self.nodes[0].pin_endpoint()
        for n in self.nodes:
            with open(n.config, "a") as f:
                f.write(f"[cluster]\nreplicas = {replicas}\n")
                if n is not self.nodes[0]:
                    f.write(f"seeds = n1@{self.nodes[0].endpoint}\n")
        self.nodes[0].stop()
        for n in self.nodes:
            n.start()
            n.pin_endpoint()
        wait_for(lambda: self.all_alive(), 20, "every node alive in every view")

    def node(self, name):
        return next(n for n in self.nodes if n.name == name)

    def cli(self, via, *args, check=True):
        return run_cli(args[0], "--connect", via.endpoint, "--server-key", via.pub,
                       "--key", self.admin, *args[1:], check=check)

    def status(self, via=None):
        via = via or next(n for n in self.nodes if n.alive())
        return json.loads(self.cli(via, "status", "--json").stdout)

    def all_alive(self):
        try:
            st = self.status()
        except AssertionError:
            return False
        states = {m["id"]: m["state"] for m in st["members"]}
        return all(states.get(n.name) == "alive" for n in self.nodes if n.alive())

    def stop(self):
        for n in self.nodes:
            n.stop()


@pytest.fixture
def make_nodes(tmp_path):
    made = []

    def make(count, replicas):
        made.append(Nodes(tmp_path, count, replicas))
        return made[-1]

    yield make
    for m in made:
        m.stop()


def make_objects(tmp_path, count, tag):
    """count objects (study, series, sop, path, bytes), sizes from 1 KiB to
    40 KiB so that both inline values and blob files are exercised."""
    out = []
    for i in range(count):
        study = f"{ROOT}.{tag}.{i % 5 + 1}"
        series, sop = study + ".1", f"{study}.1.{i + 1}"
        data = os.urandom(1024 + (i * 7919) % (40 * 1024))
        path = tmp_path / f"obj-{tag}-{i}.bin"
        path.write_bytes(data)
        out.append((study, series, sop, path, data))
    return out


def put(nodes, node, objects):
    for study, series, sop, path, _ in objects:
        node.cli(nodes.admin, "put", "--study", study, "--series", series, "--sop", sop, path)


def holds_exactly(nodes, node, objects, tmp_path):
    """True when node returns every object bit-exact."""
    for _, _, sop, _, data in objects:
        out = tmp_path / "got.bin"
        proc = node.cli(nodes.admin, "get", sop, out, check=False)
        if proc.returncode != 0 or out.read_bytes() != data:
            return False
    return True


def held(nodes, node, study):
    """How many instances of a study a node lists."""
    return len(node.cli(nodes.admin, "list", study).stdout.decode().splitlines())


def count_of(node, nodes):
    return node.stats(nodes.admin)["instances"]


def test_anti_entropy_fills_every_replica_and_status_agrees(make_nodes, tmp_path):
    nodes = make_nodes(3, 3)
    n1, n2, n3 = nodes.nodes
    objects = make_objects(tmp_path, 20, 1)
    put(nodes, n1, objects)
    wait_for(lambda: count_of(n2, nodes) == 20 and count_of(n3, nodes) == 20, 20,
             "n2 and n3 to pull what n1 holds")
    for n in (n2, n3):
        assert holds_exactly(nodes, n, objects, tmp_path), n.name
    st = wait_for(lambda: (s := nodes.status(n2))["under_replicated_partitions"] == 0 and s, 10,
                  "no under-replicated partition")
    studies = {o[0] for o in objects}
    assert st["partitions_with_data"] >= 1 and st["replicas"] == 3
    assert st["hints_pending"] == 0
    by_id = {m["id"]: m for m in st["members"]}
    assert all(by_id[n.name]["instances"] == 20 for n in nodes.nodes)
    assert all(by_id[n.name]["reachable"] for n in nodes.nodes)
    assert sum(by_id[n.name]["repair_bytes_done"] for n in (n2, n3)) == \
        2 * sum(len(o[4]) for o in objects)
    # locate names the three replicas, each holding the study's instances
    study = sorted(studies)[0]
    loc = json.loads(nodes.cli(n1, "locate", study, "--json").stdout)
    assert sorted(r["id"] for r in loc["replicas"]) == ["n1", "n2", "n3"]
    assert all(r["instances"] == 4 for r in loc["replicas"])
    text = nodes.cli(n1, "status").stdout.decode()
    assert "under-replicated: 0" in text and "n3" in text


def test_partition_written_without_pause_is_still_pulled(make_nodes, tmp_path):
    """Repair leaves a partition alone while its summaries keep changing
    (writes in flight are not damage), but for at most 15 rounds: one study
    put into n1 without pause must still reach n2 while the puts go on."""
    nodes = make_nodes(3, 3)
    n1, n2, n3 = nodes.nodes
    study = f"{ROOT}.9.1"
    objects, reached = [], 0
    deadline = time.monotonic() + 30  # 15 rounds of 300 ms is 4.5 s
    while reached == 0 and time.monotonic() < deadline:
        i = len(objects) + 1
        path, data = tmp_path / f"busy-{i}.bin", os.urandom(2048 + i)
        path.write_bytes(data)
        objects.append((study, study + ".1", f"{study}.1.{i}", path, data))
        put(nodes, n1, objects[-1:])
        if i % 4 == 0:
            reached = count_of(n2, nodes)
    assert reached > 0, f"n2 pulled nothing during {len(objects)} puts"
    wait_for(lambda: count_of(n2, nodes) == len(objects) and count_of(n3, nodes) == len(objects),
             20, "n2 and n3 to hold the study once the puts stop")
    assert holds_exactly(nodes, n3, objects, tmp_path)


def test_restarted_node_joins_catches_up_then_is_alive(make_nodes, tmp_path):
    nodes = make_nodes(3, 3)
    n1, n2, n3 = nodes.nodes
    first = make_objects(tmp_path, 10, 2)
    put(nodes, n1, first)
    wait_for(lambda: count_of(n3, nodes) == 10, 20, "n3 to hold the first objects")
    n3.kill9()
    later = make_objects(tmp_path, 12, 3)
    put(nodes, n1, later[:6])
    put(nodes, n2, later[6:])
    offset = n3.log.stat().st_size
    n3.restart()
    wait_for(lambda: count_of(n3, nodes) == 22, 30, "n3 to catch up after its restart")
    assert holds_exactly(nodes, n3, first + later, tmp_path)
    log = n3.log.read_text(errors="replace")[offset:]
    assert "announces itself alive" in log, log[-3000:]
    # it started JOINING and announced ALIVE once caught up
    assert re.search(r"membership: n3 .*incarnation", log)
    wait_for(lambda: nodes.status(n1)["under_replicated_partitions"] == 0, 10, "full replication")


def test_handoff_deletes_only_what_every_owner_holds(make_nodes, tmp_path):
    nodes = make_nodes(3, 2)
    n1 = nodes.nodes[0]
    objects = make_objects(tmp_path, 15, 4)
    # put every study on a node that does not own it (as a hinted stand-in would)
    by_study = {}
    for o in objects:
        by_study.setdefault(o[0], []).append(o)
    placed = {}
    for study, objs in by_study.items():
        loc = json.loads(nodes.cli(n1, "locate", study, "--json").stdout)
        owners = [r["id"] for r in loc["replicas"]]
        assert len(owners) == 2
        outsider = next(n for n in nodes.nodes if n.name not in owners)
        put(nodes, outsider, objs)
        placed[study] = (owners, outsider)
    for study, (owners, outsider) in placed.items():
        objs = by_study[study]
        wait_for(lambda: all(holds_exactly(nodes, nodes.node(o), objs, tmp_path)
                             for o in owners), 20, f"the owners of {study} to pull it")
    wait_for(lambda: (s := nodes.status(n1))["hints_pending"] == 0 and s, 20,
             "stand-ins to hand off and delete")
    for study, (owners, outsider) in placed.items():
        assert held(nodes, outsider, study) == 0, (study, outsider.name)
        for o in owners:
            assert held(nodes, nodes.node(o), study) == len(by_study[study])
    st = nodes.status(n1)
    assert st["under_replicated_partitions"] == 0
    assert sum(m["instances"] for m in st["members"] if m["role"] == "storage") == 2 * 15


def test_handoff_waits_for_a_down_owner(make_nodes, tmp_path):
    nodes = make_nodes(3, 2)
    n1 = nodes.nodes[0]
    objects = make_objects(tmp_path, 4, 5)
    study = objects[0][0]
    objs = [o for o in objects if o[0] == study]
    loc = json.loads(nodes.cli(n1, "locate", study, "--json").stdout)
    owners = [r["id"] for r in loc["replicas"]]
    outsider = next(n for n in nodes.nodes if n.name not in owners)
    down = nodes.node(owners[1])
    down.kill9()
    put(nodes, outsider, objs)
    live_owner = nodes.node(owners[0])
    wait_for(lambda: holds_exactly(nodes, live_owner, objs, tmp_path), 20, "the live owner")
    time.sleep(2)  # several rounds: the stand-in must keep its copy for the down owner
    assert held(nodes, outsider, study) == len(objs)
    st = nodes.status(outsider)
    assert st["hints_pending"] >= len(objs)
    assert st["under_replicated_partitions"] >= 1
    down.restart()
    wait_for(lambda: held(nodes, outsider, study) == 0, 30,
             "the hand-off once the owner is back")
    assert holds_exactly(nodes, down, objs, tmp_path)


def test_drain_is_refused_without_enough_other_members(make_nodes, tmp_path):
    nodes = make_nodes(3, 3)
    n1, _, n3 = nodes.nodes
    proc = nodes.cli(n1, "drain", "n3", check=False)
    assert proc.returncode != 0
    assert b"fewer than the 3 replicas" in proc.stderr, proc.stderr
    assert n3.alive()
    assert {m["id"]: m["state"] for m in nodes.status(n1)["members"]}["n3"] == "alive"
