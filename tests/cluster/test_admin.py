"""The admin HTTP port of nodes and routers (common/admin.c): /metrics in
the Prometheus text format (checked by `promtool check metrics`), /healthz
and /readyz, counters that move with real DICOM traffic, and a real
Prometheus (started here on loopback with its own data folder and a short
scrape interval) that scrapes a local cluster and answers a query for
under-replicated partitions after a node is killed. Every process asks for
port 0 and logs the port it got."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"
ROOT = gen.UID_ROOT + ".91"
ADMIN = {"admin": {"listen": "127.0.0.1:0"}}
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def admin_port(proc) -> int:
    """The admin port a node or router logged at start."""
    m = None
    sc.wait_until(lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics",
                                    proc.log_text(this_run=True)), 10, "admin port logged")
    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", proc.log_text(this_run=True))
    return int(m.group(1))


def scrape(port) -> str:
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return r.text


def sample(text, name, labels="") -> float:
    """The value of one sample (labels as written, e.g. 'op="store",status="success"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {key} in:\n{text[:4000]}")


def make_instance(path: Path, study: str, i: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = gen.SC_IMAGE
    meta.MediaStorageSOPInstanceUID = f"{study}.1.{i}"
    meta.TransferSyntaxUID = gen.EXPLICIT_LE
    meta.ImplementationClassUID = ROOT + ".0"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = gen.SC_IMAGE
    ds.SOPInstanceUID = f"{study}.1.{i}"
    ds.StudyDate = "20260101"
    ds.Modality = "OT"
    ds.PatientName = "Admin^Metrics"
    ds.PatientID = "ADMIN"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 31 + k) % 256 for k in range(256))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return path


@pytest.fixture
def cluster(tmp_path):
    with sc.cluster(tmp_path / "cluster", nodes=3, replicas=3, quorum=2,
                    node_extra=ADMIN, router_extra=ADMIN) as c:
        yield c


def test_metrics_health_and_traffic(cluster, tmp_path):
    router = cluster.router
    ports = {p.name: admin_port(p) for p in cluster.processes()}
    for name, port in ports.items():
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        sc.wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz",
                                           timeout=5).status_code == 200, 30, f"{name} ready")
        assert requests.get(f"http://127.0.0.1:{port}/nothing", timeout=5).status_code == 404
        assert requests.post(f"http://127.0.0.1:{port}/metrics",
                             timeout=5).status_code == 405

    # Traffic: 6 stores in 2 studies, a find, an echo.
    files = [make_instance(tmp_path / "in" / f"{s}-{i}.dcm", f"{ROOT}.{s}", i)
             for s in (1, 2) for i in range(3)]
    p = sc.dcmtk(["storescu", "-d", "-aec", AE, "127.0.0.1", router.port, *files])
    assert [st for _, st in sc.store_responses(p.out)] == [0] * 6
    sc.dcmtk(["findscu", "-S", "-aec", AE, "-k", "QueryRetrieveLevel=STUDY",
              "-k", "PatientID=ADMIN", "-k", "StudyInstanceUID", "127.0.0.1", router.port])
    sc.dcmtk(["echoscu", "-aec", AE, "127.0.0.1", router.port])

    text = scrape(ports[router.name])
    assert sample(text, "shardpacs_router_dimse_operations_total",
                  'op="store",status="success"') == 6
    assert sample(text, "shardpacs_router_dimse_operations_total",
                  'op="find",status="success"') == 1
    assert sample(text, "shardpacs_router_dimse_operations_total",
                  'op="echo",status="success"') == 1
    assert sample(text, "shardpacs_router_dimse_duration_seconds_count", 'op="find"') == 1
    assert sample(text, "shardpacs_router_received_bytes_total") >= 6 * 256
    assert sample(text, "shardpacs_router_storage_members_reachable") == 3
    assert sample(text, "shardpacs_gossip_members", 'role="storage",state="alive"') == 3
    assert sample(text, "process_resident_memory_bytes") > 0
    assert sample(text, "process_cpu_seconds_total") > 0

    puts = 0
    for n in cluster.nodes:
        text = scrape(ports[n.name])
        puts += sample(text, "shardpacs_node_requests_total", 'kind="put",result="ok"')
        assert sample(text, "shardpacs_disk_free_bytes") > 0
        assert sample(text, "shardpacs_disk_size_bytes") >= sample(text, "shardpacs_disk_free_bytes")
        sample(text, "shardpacs_rocksdb_pending_compaction_bytes")
        sample(text, "shardpacs_under_replicated_partitions")
    assert puts >= 6 * 2  # W = 2 at least, N = 3 usually

    if PROMTOOL is None:
        pytest.skip("promtool not installed (deploy/install-deps.sh installs prometheus)")
    for name, port in ports.items():
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(port).encode(),
                             capture_output=True, timeout=30)
        assert out.returncode == 0, (name, out.stdout.decode() + out.stderr.decode())


def test_admin_off_by_default_and_json_logs(tmp_path):
    """No admin port unless asked; [log] format = json gives one JSON object
    per line (ts, level, component, msg) on a node and a router."""
    log = {"log": {"format": "json"}}
    with sc.cluster(tmp_path / "c", nodes=1, replicas=1, quorum=1, node_extra=log,
                    router_extra=log) as c:
        sc.dcmtk(["echoscu", "-aec", AE, "127.0.0.1", c.router.port])
        for p, component, first in ((c.nodes[0], "node[n1]", "node n1 "),
                                    (c.router, "router", "member n1 ")):
            text = p.log_text()
            assert "metrics on http" not in text
            lines = text.splitlines()
            assert len(lines) >= 3
            for line in lines:
                rec = json.loads(line)
                assert set(rec) == {"ts", "level", "component", "msg"}, line
                assert rec["component"] == component
                assert rec["level"] in ("debug", "info", "warn", "error")
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
            assert any(json.loads(x)["msg"].startswith(first) for x in lines)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")
def test_prometheus_scrapes_cluster(cluster, tmp_path):
    ports = {p.name: admin_port(p) for p in cluster.processes()}
    files = [make_instance(tmp_path / "in" / f"{s}.dcm", f"{ROOT}.{10 + s}", 0)
             for s in range(8)]
    p = sc.dcmtk(["storescu", "-d", "-aec", AE, "127.0.0.1", cluster.router.port, *files])
    assert [st for _, st in sc.store_responses(p.out)] == [0] * 8

    prom_port = sc.free_port()
    conf = tmp_path / "prometheus.yml"
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in ports.values())
    conf.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: shardpacs\n"
                    f"    static_configs:\n      - targets: [{targets}]\n")
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={conf}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=log)
    api = f"http://127.0.0.1:{prom_port}/api/v1/query"

    def query(q):
        try:
            r = requests.get(api, params={"query": q}, timeout=5).json()
        except (requests.RequestException, ValueError):
            return None
        if r.get("status") != "success" or not r["data"]["result"]:
            return None
        return r["data"]["result"]

    try:
        up = sc.wait_until(lambda: (lambda r: r if r and len(r) == 4 and
                                    all(x["value"][1] == "1" for x in r) else None)(
                                        query("up")), 60, "every target up")
        assert len(up) == 4
        # Healthy: every partition with data fully replicated.
        sc.wait_until(lambda: (lambda r: r and float(r[0]["value"][1]) == 0)(
            query("max(shardpacs_under_replicated_partitions)")), 60, "0 under-replicated")
        # A node dies: its partitions (all of them, N = 3 over 3 nodes) are
        # under-replicated at the survivors' next rounds.
        cluster.nodes[2].kill9()
        res = sc.wait_until(lambda: (lambda r: r if r and float(r[0]["value"][1]) >= 8
                                     else None)(
            query("max(shardpacs_under_replicated_partitions{job='shardpacs'})")), 90,
            "under-replicated partitions seen by Prometheus")
        assert float(res[0]["value"][1]) >= 8
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        log.close()


def test_disk_reserve(cluster, tmp_path):
    """A node whose free space is below [store] reserve refuses new objects
    with a reason naming it and the reserve, still takes repair copies, and
    shows the state in its metrics; with too few accepting nodes the router
    answers 0xA700 with that reason."""
    n1, n3 = cluster.nodes[0], cluster.nodes[2]
    n3.stop()
    n3.configure({"store": {"reserve": "1048576G"}})  # 1 PiB: more than any disk here
    n3.start()
    cluster.wait_alive(timeout=60)
    study = f"{ROOT}.30"
    files = [make_instance(tmp_path / "r" / f"{i}.dcm", study, i) for i in range(2)]
    p = sc.dcmtk(["storescu", "-d", "-aec", AE, "127.0.0.1", cluster.router.port, *files])
    assert [st for _, st in sc.store_responses(p.out)] == [0, 0]  # W = 2 on n1, n2

    text = scrape(admin_port(n3))
    assert sample(text, "shardpacs_node_refusing_puts") == 1
    assert sample(text, "shardpacs_disk_reserve_bytes") == 2 ** 50
    assert sample(text, "shardpacs_node_requests_total", 'kind="put",result="error"') >= 2
    assert "below the reserve" in n3.log_text(this_run=True)
    assert sample(scrape(admin_port(n1)), "shardpacs_node_refusing_puts") == 0
    # The operator's status shows it too (n1 answers for the whole cluster).
    st = json.loads(sc.run_cli("status", "--connect", n1.endpoint, "--server-key", n1.pub,
                               "--key", cluster.admin_key, "--json").stdout)
    by_id = {m["id"]: m for m in st["members"]}
    assert by_id["n3"]["refusing_puts"] is True and by_id["n1"]["refusing_puts"] is False
    assert by_id["n1"]["disk_free"] > 0
    text_status = sc.run_cli("status", "--connect", n1.endpoint, "--server-key", n1.pub,
                             "--key", cluster.admin_key).stdout.decode()
    assert re.search(r"^n3 .*disk below reserve: refusing new objects", text_status, re.M), \
        text_status
    # Repair copies are not new objects: n3 still receives what it owns.
    sc.wait_until(lambda: len(n3.list_study(cluster.admin_key, study)) == 2, 60,
                  "n3 filled by repair despite its reserve")

    n1.kill9()
    cluster.wait_member("n1", ("down", "out"), observers=[cluster.router])
    late = make_instance(tmp_path / "r" / "late.dcm", study, 9)
    p = sc.dcmtk(["storescu", "-d", "-aec", AE, "127.0.0.1", cluster.router.port, late],
                 check=False)
    assert [st for _, st in sc.store_responses(p.out)] == [0xA700], p.out[-3000:]
    assert "node n3 refuses new objects" in p.out and "reserve" in p.out, p.out[-3000:]
