"""Access control and audit through a real router and real nodes, driven by
DCMTK's clients (TCP_NODELAY=1):

* each DICOM access rule both ways: what a rule allows works, what it does
  not is refused with the standard's answer (A-ASSOCIATE-RJ for a peer no
  rule admits, 0x0124 Refused: Not Authorized for an operation, 0xA801 for
  a C-MOVE destination the rule does not list), and the router logs it;
* the rules file re-read on change, and a bad new version refused (the
  previous rules stay);
* the audit trail: one record per operation with the right actor, study
  and outcome; the records of acknowledged C-STOREs survive kill -9 of the
  router;
* key roles on the nodes: a router's or a node's key refused for status
  and drain (logged and audited by the node), the operator's key allowed;
* the ingest rate with auditing off, on (sync = write) and on (sync =
  commit) in the same run: printed, not asserted.

Run: /usr/bin/python3 -m pytest -q -s tests/cluster/test_access.py
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"
RULES = """# calling AE   conditions            operations
STORER         allow=store,echo
READER         allow=find,get,echo
MOVER          allow=move,echo   move_to=DEST
LOCAL*         from=127.0.0.*        allow=echo
ELSEWHERE      from=10.*             allow=all
BLOCKED        allow=none
"""


class Env:
    def __init__(self, base: Path):
        self.data = gen.make_bulk_set(base / "data", small=60, ct=0, studies=3, seed=7)
        self.dest = sc.Scp(base / "dest", "DEST")
        self.other = sc.Scp(base / "other", "OTHER")
        self.rules = base / "rules.txt"
        self.rules.write_text(RULES)
        self.c = sc.cluster(base / "cluster", nodes=3,
                            dests={"DEST": self.dest.port, "OTHER": self.other.port},
                            router_extra={"access": {"rules": str(self.rules)}})
        self.router = self.c.router
        self.audit = self.router.dir / "audit.jsonl"

    def set_rules(self, text):
        tmp = self.rules.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.rules)
        time.sleep(1.3)  # rules are looked at at most once a second

    def records(self, path=None):
        path = path or self.audit
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self):
        self.c.stop()
        self.dest.stop()
        self.other.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("access"))
    yield e
    e.stop()


def dcmtk(args):
    return sc.dcmtk(args, check=False, timeout=120)


def echo(env, aet):
    return dcmtk(["echoscu", "-v", "-aet", aet, "-aec", AE, "127.0.0.1", env.router.port])


def store(env, aet, paths):
    return dcmtk(["storescu", "-d", "-nh", "-aet", aet, "-aec", AE, "127.0.0.1", env.router.port,
                  *map(str, paths)])


def final_status(out):
    st = sc.dimse_statuses(out)
    assert st, out[-3000:]
    return st[-1]


def find(env, aet, study):
    p = dcmtk(["findscu", "-d", "-S", "-aet", aet, "-aec", AE, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={study}", "-k", "PatientID", "127.0.0.1",
               env.router.port])
    return final_status(p.out), p.out


def get(env, aet, study, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    p = dcmtk(["getscu", "-d", "-S", "-aet", aet, "-aec", AE, "-od", out,
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
               "127.0.0.1", env.router.port])
    return final_status(p.out), len(list(out.iterdir()))


def move(env, aet, dest, study):
    p = dcmtk(["movescu", "-d", "-S", "-aet", aet, "-aec", AE, "-aem", dest,
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
               "127.0.0.1", env.router.port])
    return final_status(p.out), p.out


def rejected(out):
    return "Association Rejected" in out and "Calling AE Title Not Recognized" in out


# ---- the rules, both ways ---------------------------------------------------------

def test_peers_no_rule_admits_are_rejected_at_association(env):
    for aet in ("STRANGER", "BLOCKED"):
        p = echo(env, aet)
        assert p.returncode != 0 and rejected(p.out), p.out
    # from= : LOCAL* is admitted from loopback; ELSEWHERE only from 10.*.
    assert "Received Echo Response (Success)" in echo(env, "LOCALHOST").out
    assert rejected(echo(env, "ELSEWHERE").out)
    log = env.router.log_text()
    assert "calling AE 'STRANGER'" in log and "no access rule matches it" in log
    assert "its access rule (line 7) allows nothing" in log
    refused = [r for r in env.records() if r["event_id"] == "DCM 110114" and r["outcome"] == 4]
    assert {r["actor"]["ae_title"] for r in refused} >= {"STRANGER", "BLOCKED", "ELSEWHERE"}
    assert all(r["actor"]["address"] == "127.0.0.1" for r in refused)


def test_store_allowed_and_refused(env):
    paths = env.data.small_paths[:30]
    p = store(env, "STORER", paths)
    got = sc.store_responses(p.out)
    assert len(got) == 30 and all(st == 0 for _, st in got), p.out[-3000:]
    p = store(env, "READER", env.data.small_paths[30:33])
    got = sc.store_responses(p.out)
    assert [st for _, st in got] == [0x0124] * 3, p.out[-3000:]
    assert "store from calling AE 'READER'" in env.router.log_text()
    recs = [r for r in env.records() if r.get("operation") == "C-STORE"]
    ok = [r for r in recs if r["actor"]["ae_title"] == "STORER"]
    assert len(ok) == 30 and all(r["outcome"] == 0 and r["instances"] == 1 for r in ok)
    assert all(r["event_id"] == "DCM 110104" and r["action"] == "C" for r in ok)
    assert {r["studies"][0] for r in ok} <= set(env.data.study_uids)
    assert all(r["patient_id"].startswith("BULK7-") for r in ok)
    bad = [r for r in recs if r["actor"]["ae_title"] == "READER"]
    assert len(bad) == 3 and all(r["outcome"] == 4 and r["status"] == "0x0124" for r in bad)


def test_echo_refused_by_the_rule(env):
    # MOVER may echo; STORER too; a rule without echo answers 0x0124.
    env.set_rules(RULES.replace("allow=move,echo", "allow=move"))
    try:
        p = echo(env, "MOVER")
        assert "Received Echo Response (Unknown Status: 0x124)" in p.out, p.out
        assert "Received Echo Response (Success)" in echo(env, "STORER").out
    finally:
        env.set_rules(RULES)


def test_find_and_get_allowed_and_refused(env, tmp_path):
    study = env.data.study_uids[0]
    status, out = find(env, "READER", study)
    assert status == 0 and "PatientID" in out
    status, _ = find(env, "STORER", study)
    assert status == 0x0124
    status, n = get(env, "READER", study, tmp_path / "ok")
    assert status == 0 and n == 10, (hex(status), n)
    status, n = get(env, "MOVER", study, tmp_path / "no")
    assert status == 0x0124 and n == 0
    recs = env.records()
    q = [r for r in recs if r["event_id"] == "DCM 110112"]
    assert any(r["actor"]["ae_title"] == "READER" and r["outcome"] == 0 and
               r["studies"] == [study] and "1 matches" in r["detail"] for r in q)
    assert any(r["actor"]["ae_title"] == "STORER" and r["status"] == "0x0124" for r in q)
    g = [r for r in recs if r.get("operation") == "C-GET"]
    assert any(r["actor"]["ae_title"] == "READER" and r["instances"] == 10 and
               r["studies"] == [study] and r["action"] == "R" for r in g)
    assert any(r["actor"]["ae_title"] == "MOVER" and r["outcome"] == 4 for r in g)


def test_move_allowed_destination_only(env):
    study = env.data.study_uids[1]
    env.dest.clear()
    status, _ = move(env, "MOVER", "DEST", study)
    assert status == 0
    assert len(env.dest.files()) == 10
    status, out = move(env, "MOVER", "OTHER", study)
    assert status == 0xA801, out[-2000:]
    assert not list(env.other.dir.iterdir())
    status, _ = move(env, "READER", "DEST", study)
    assert status == 0x0124
    assert "does not allow moves to 'OTHER'" in env.router.log_text()
    m = [r for r in env.records() if r.get("operation") == "C-MOVE"]
    assert any(r["destination"] == "DEST" and r["instances"] == 10 and r["outcome"] == 0 for r in m)
    assert any(r["destination"] == "OTHER" and r["status"] == "0xA801" for r in m)


def test_rules_reload_and_a_bad_version_is_refused(env):
    paths = env.data.small_paths[33:36]
    # Swapped: READER may store now, STORER nothing at all.
    env.set_rules("READER allow=store\nSTORER allow=none\n")
    try:
        assert all(st == 0 for _, st in sc.store_responses(store(env, "READER", paths).out))
        assert rejected(echo(env, "STORER").out)
        assert "access rules" in env.router.log_text() and "reloaded: 2 rules" in \
            env.router.log_text()
        # A malformed version is refused: the swapped rules stay.
        env.set_rules("READER allow=store,teleport\n")
        assert rejected(echo(env, "STORER").out)
        p = store(env, "READER", paths[:1])
        assert [st for _, st in sc.store_responses(p.out)] == [0]
        assert "keeping the previous 2 rules" in env.router.log_text()
        recs = [r for r in env.records() if r["event_id"] == "DCM 110113"]
        assert any(r["outcome"] == 0 and "reloaded" in r["detail"] for r in recs)
        assert any(r["outcome"] == 4 and "teleport" in r["detail"] for r in recs)
    finally:
        env.set_rules(RULES)
    assert "Received Echo Response (Success)" in echo(env, "STORER").out


# ---- key roles on the nodes ---------------------------------------------------------

def test_router_and_node_keys_refused_for_admin_requests(env):
    n1, n2 = env.c.nodes[0], env.c.nodes[1]

    def admin(key, *args):
        return sc.run_cli(args[0], "--connect", n1.endpoint, "--server-key", n1.pub,
                          "--key", key, *args[1:], check=False)

    for key, who in ((env.router.key, "router1"), (n2.key, "n2")):
        for args in (("status",), ("drain", "n3")):
            p = admin(key, *args)
            assert p.returncode != 0, p.stdout
            assert b"not authorized" in p.stderr or b"refused" in p.stderr, p.stderr
        assert sc.run_cli("node", "--connect", n1.endpoint, "--server-key", n1.pub, "--key",
                          key, "stats", check=False).returncode != 0
    # (The CLI's drain starts with a cluster status, refused the same way.)
    st = json.loads(admin(env.c.admin_key, "status", "--json").stdout)
    assert {m["id"]: m["state"] for m in st["members"]}["n3"] == "alive"  # not draining
    log = n1.log_text()
    assert "status request from router1" in log and "refused: key role router" in log
    assert "status request from n2" in log and "refused: key role node" in log
    assert "stats request from n2" in log
    recs = env.records(n1.dir / "audit.jsonl")
    refused = [r for r in recs if r["event_id"] == "DCM 110113" and r["outcome"] == 4]
    assert {(r["actor"]["user"], r["operation"]) for r in refused} >= {
        ("router1", "status"), ("router1", "stats"), ("n2", "status"), ("n2", "stats")}
    assert all(r["actor"]["role"] in ("router", "node") for r in refused)
    assert any(r["actor"].get("user") == "admin" and r.get("operation") == "status" and
               r["outcome"] == 0 for r in recs)
    # Membership changes are in every member's trail.
    assert any(r["event_id"] == "DCM 110108" for r in recs)


# ---- durability ---------------------------------------------------------------------

def test_audit_records_of_acknowledged_stores_survive_kill9(env, tmp_path):
    more = gen.make_bulk_set(tmp_path / "more", small=1500, ct=0, studies=2, seed=8)
    log = tmp_path / "storescu.log"
    with open(log, "wb") as f:  # a file, not a pipe: -d output would fill a pipe and stall
        proc = subprocess.Popen(["storescu", "-d", "-aet", "STORER", "-aec", AE, "127.0.0.1",
                                 str(env.router.port), *map(str, more.small_paths)],
                                env=sc.DCMTK_ENV, stdout=f, stderr=subprocess.STDOUT)
    # Killed mid-run: once the trail holds 200 of this run's stores.
    sc.wait_until(lambda: sum(1 for r in env.records() if r.get("operation") == "C-STORE" and
                              r.get("studies", [""])[0] in more.study_uids) >= 200,
                  60, "200 stores of the run audited")
    env.router.kill9()
    proc.wait(timeout=60)
    out = log.read_text(errors="replace")
    acked = {uid for uid, st in sc.store_responses(out) if st == 0}
    assert 0 < len(acked) < 1500, len(acked)  # killed mid-run
    recorded = {r["sop_instance_uid"] for r in env.records()
                if r.get("operation") == "C-STORE" and r["outcome"] == 0}
    missing = acked - recorded
    assert not missing, f"{len(missing)} acknowledged stores without a record"
    print(f"\nkill -9 after {len(acked)} acknowledged stores: every one has its record")
    env.router.start()


# ---- cost --------------------------------------------------------------------------

def ingest_seconds(port, paths, associations=4):
    parts = [paths[i::associations] for i in range(associations)]
    t = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-nh", "-aet", "STORER", "-aec", AE, "127.0.0.1",
                               str(port), *map(str, part)], env=sc.DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for part in parts]
    for p in procs:
        p.communicate(timeout=600)
        assert p.returncode == 0
    return time.monotonic() - t


def test_audit_overhead_is_printed(env, tmp_path):
    """4 storescu associations of small images through the same router
    with auditing off, sync = write and sync = commit, rounds interleaved;
    each run stores new instances. Printed, not asserted."""
    r = env.router
    per_run, rounds = 300, 2
    modes = {"off": {"file": ""}, "write": {"sync": "write"}, "commit": {"sync": "commit"}}
    rates = {m: [] for m in modes}
    seed = 100
    for _ in range(rounds):
        for mode, audit in modes.items():
            r.stop()
            r.extra = {"access": {"rules": str(env.rules)}, "audit": audit}
            r.start()
            seed += 1
            data = gen.make_bulk_set(tmp_path / f"d{seed}", small=per_run, ct=0, studies=4,
                                     seed=seed)
            rates[mode].append(per_run / ingest_seconds(r.port, data.small_paths))
    r.stop()
    r.extra = {"access": {"rules": str(env.rules)}}
    r.start()
    med = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    print(f"\naudit overhead, 4 associations x small images, {rounds} rounds of {per_run}:")
    for m in modes:
        print(f"  audit {m:6s}: " + ", ".join(f"{x:.0f}" for x in rates[m]) +
              f" instances/s (median {med[m]:.0f}, {med[m] / med['off']:.2f} x off)")
