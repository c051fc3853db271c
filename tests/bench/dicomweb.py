#!/usr/bin/python3
"""DICOMweb benchmark: ShardPACS's router beside Orthanc with its DICOMweb
plugin (Debian's orthanc + orthanc-dicomweb), on the same data, with the same
HTTP client (python-requests, one Session per client thread). Run it after
a build:

    /usr/bin/python3 tests/bench/dicomweb.py [--ct N] [--studies N] [--stow N] [--quick]

ShardPACS: 3 nodes (N=3, W=2) and one router, DICOMweb on plain HTTP with
authentication off (Orthanc's is off too). Orthanc: its own storage and
index under a temporary folder, SQLite index, no compression, DICOMweb
plugin with full metadata (the plugin's default, what a viewer needs). Both
on loopback, ports chosen free. Both get the same files over DICOM
(storescu): a CT series of --ct 512x512 instances (default 500) and --studies
small studies (64x64, 4 instances each) for the study search. Measured, each
server in turn:

1. QIDO-RS study search: the viewer's study-list query (limit=101,
   includefield) and one by PatientID; median of 30 (10 with --quick).
2. Series metadata of the CT series: the first request (cold: ShardPACS
   reads the objects and fills its cache; Orthanc reads its files) and the
   median of 5 more (warm).
3. WADO-RS retrieval of the whole CT series (multipart, as stored): MB/s of
   the body, best of 2.
4. Frames: frame 1 of every instance of the CT series
   (multipart octet-stream, transfer-syntax=*), 4 client threads: frames/s.
5. STOW-RS ingest: --stow new 512x512 CT instances (default 200), 4 client
   threads, each posting requests of 10 instances: instances/s and MB/s.

Prints a Markdown table with ShardPACS/Orthanc ratios (>1: ShardPACS better,
times inverted so). Asserts nothing about speed. Progress on stderr."""
import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import threading
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import dataset  # noqa: E402
import spcluster  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC = "/usr/sbin/Orthanc"
DICOM_ALL = 'multipart/related; type="application/dicom"'
OCTET_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Orthanc:
    def __init__(self, work: Path):
        self.dir = work / "orthanc"
        (self.dir / "storage").mkdir(parents=True)
        (self.dir / "index").mkdir()
        self.dicom_port, self.http_port = spcluster.free_port(), spcluster.free_port()
        conf = {
            "Name": "bench", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"), "StorageCompression": False,
            "Plugins": [PLUGIN], "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "HttpThreadsCount": 50,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        (self.dir / "orthanc.json").write_text(json.dumps(conf, indent=1))
        self.log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(self.dir / "orthanc.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        self.base = f"http://127.0.0.1:{self.http_port}/dicom-web"
        t0 = time.monotonic()
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{self.http_port}/plugins/dicom-web",
                                timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                raise SystemExit(f"Orthanc did not start; see {self.dir}/orthanc.log")
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def session():
    s = requests.Session()
    s.trust_env = False
    return s


def store(port, aet, files):
    t0 = time.monotonic()
    out = spcluster.dcmtk(["storescu", "-aec", aet, "127.0.0.1", str(port)] + [str(f) for f in files],
                          timeout=1800)
    assert out.returncode == 0, out.out[-2000:]
    return time.monotonic() - t0


def timed_get(s, url, **kw):
    t0 = time.monotonic()
    r = s.get(url, **kw)
    n = len(r.content)
    dt = time.monotonic() - t0
    assert r.status_code in (200, 204), (url, r.status_code, r.text[:300])
    return dt, n, r


def multipart_body(objects):
    b = uuid.uuid4().hex
    parts = []
    for o in objects:
        parts.append(f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(o)
        parts.append(b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), b


def bench(name, base, dicom, series, sops, stow_files, reps):
    st, se = series
    s = session()
    res = {}
    # 1. QIDO
    list_q = (f"{base}/studies?limit=101&offset=0&fuzzymatching=false"
              "&includefield=00081030,00080060")
    timed_get(s, list_q)
    res["qido_list_ms"] = 1000 * statistics.median(timed_get(s, list_q)[0] for _ in range(reps))
    pid_q = f"{base}/studies?00100020=BULK1-003&includefield=00081030"
    dt, _, r = timed_get(s, pid_q)
    assert r.status_code == 200 and len(r.json()) >= 1, (name, r.status_code, r.text[:200])
    res["qido_pid_ms"] = 1000 * statistics.median(timed_get(s, pid_q)[0] for _ in range(reps))
    log(f"{name}: QIDO list {res['qido_list_ms']:.1f} ms, by PatientID {res['qido_pid_ms']:.1f} ms")
    # 2. series metadata, cold then warm
    murl = f"{base}/studies/{st}/series/{se}/metadata"
    dt, n, r = timed_get(s, murl, headers={"Accept": "application/dicom+json"})
    assert len(r.json()) == len(sops), (name, len(r.json()))
    res["meta_cold_s"] = dt
    res["meta_warm_ms"] = 1000 * statistics.median(
        timed_get(s, murl, headers={"Accept": "application/dicom+json"})[0] for _ in range(5))
    res["meta_bytes"] = n
    log(f"{name}: metadata cold {dt:.2f} s, warm {res['meta_warm_ms']:.0f} ms ({n} bytes)")
    # 3. WADO-RS series
    best = None
    for _ in range(2):
        t0 = time.monotonic()
        r = s.get(f"{base}/studies/{st}/series/{se}", headers={"Accept": DICOM_ALL}, stream=True)
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        n = sum(len(c) for c in r.iter_content(1 << 20))
        dt = time.monotonic() - t0
        best = dt if best is None else min(best, dt)
    res["wado_mb_s"] = n / best / 1e6
    res["wado_bytes"] = n
    log(f"{name}: WADO-RS series {n / 1e6:.0f} MB in {best:.2f} s ({res['wado_mb_s']:.0f} MB/s)")
    # 4. frames, 4 threads
    local = threading.local()

    def tsession():
        if not hasattr(local, 's'):
            local.s = session()
        return local.s

    def frame(sop):
        ss = tsession()
        r = ss.get(f"{base}/studies/{st}/series/{se}/instances/{sop}/frames/1",
                   headers={"Accept": OCTET_ANY})
        assert r.status_code == 200, (name, r.status_code, r.text[:200])
        return len(r.content)

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(4) as ex:
        sizes = list(ex.map(frame, sops))
    dt = time.monotonic() - t0
    assert all(x > 512 * 512 * 2 for x in sizes), (name, min(sizes))
    res["frames_s"] = len(sops) / dt
    log(f"{name}: {len(sops)} frames in {dt:.2f} s ({res['frames_s']:.0f}/s)")
    # 5. STOW-RS, 4 clients, 10 instances per request
    chunks = [stow_files[i:i + 10] for i in range(0, len(stow_files), 10)]

    def post(chunk):
        ss = tsession()
        body, b = multipart_body([p.read_bytes() for p in chunk])
        r = ss.post(f"{base}/studies", data=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
            "Accept": "application/dicom+json"})
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        return len(body)

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(4) as ex:
        nbytes = sum(ex.map(post, chunks))
    dt = time.monotonic() - t0
    res["stow_inst_s"] = len(stow_files) / dt
    res["stow_mb_s"] = nbytes / dt / 1e6
    log(f"{name}: STOW-RS {len(stow_files)} instances in {dt:.2f} s "
        f"({res['stow_inst_s']:.0f}/s, {res['stow_mb_s']:.0f} MB/s)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct", type=int, default=500)
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--stow", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="--ct 100 --studies 10 --stow 40, fewer repeats")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    reps = 30
    if a.quick:
        a.ct, a.studies, a.stow, reps = min(a.ct, 100), min(a.studies, 10), min(a.stow, 40), 10
    for p in (ORTHANC, PLUGIN):
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-", dir=os.environ.get("TMPDIR")))
    t_start = time.monotonic()
    cluster = orthanc = None
    try:
        log(f"generating data in {work} ...")
        ct = dataset.make_bulk_set(work / "ct", small=0, ct=a.ct, studies=1, seed=0)
        small = dataset.make_bulk_set(work / "small", small=4 * a.studies, ct=0,
                                      studies=a.studies, seed=1)
        stow_sp = dataset.make_bulk_set(work / "stow_sp", small=0, ct=a.stow, studies=4, seed=2)
        stow_or = dataset.make_bulk_set(work / "stow_or", small=0, ct=a.stow, studies=4, seed=3)
        import pydicom
        first = pydicom.dcmread(str(ct.ct_paths[0]), stop_before_pixels=True)
        series = (first.StudyInstanceUID, first.SeriesInstanceUID)
        sops = [pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in ct.ct_paths]

        http_port = spcluster.free_port()
        http = {"port": str(http_port), "bind": "127.0.0.1", "auth": "off"}
        cluster = spcluster.cluster(work / "sp", nodes=3, router_extra={"http": http})
        spcluster.wait_port(http_port)
        orthanc = Orthanc(work)
        files = ct.ct_paths + small.small_paths
        mb = (ct.ct_bytes + small.small_bytes) / 1e6
        for name, port, aet in (("ShardPACS", cluster.router.port, "SHARDPACS"),
                                ("Orthanc", orthanc.dicom_port, "ORTHANC")):
            dt = store(port, aet, files)
            log(f"{name}: stored {len(files)} files ({mb:.0f} MB) over DICOM in {dt:.1f} s")
        results = {
            "ShardPACS": bench("ShardPACS", f"http://127.0.0.1:{http_port}/dicom-web",
                               None, series, sops, stow_sp.ct_paths, reps),
            "Orthanc": bench("Orthanc", orthanc.base, None, series, sops, stow_or.ct_paths, reps),
        }
    finally:
        if orthanc:
            orthanc.stop()
        if cluster:
            cluster.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    sp, orr = results["ShardPACS"], results["Orthanc"]
    rows = [
        ("QIDO study list (viewer's query), median ms", "qido_list_ms", 1, False, "{:.1f}"),
        ("QIDO studies by PatientID, median ms", "qido_pid_ms", 1, False, "{:.1f}"),
        (f"series metadata, {a.ct} instances, cold, s", "meta_cold_s", 1, False, "{:.2f}"),
        (f"series metadata, {a.ct} instances, warm, median ms", "meta_warm_ms", 1, False, "{:.0f}"),
        (f"WADO-RS series retrieval ({sp['wado_bytes'] / 1e6:.0f} MB), MB/s", "wado_mb_s", 1, True, "{:.0f}"),
        ("frames (512x512 CT, 4 clients), frames/s", "frames_s", 1, True, "{:.0f}"),
        (f"STOW-RS ingest ({a.stow} CT instances, 4 clients), instances/s", "stow_inst_s", 1, True, "{:.0f}"),
        ("STOW-RS ingest, MB/s", "stow_mb_s", 1, True, "{:.0f}"),
    ]
    print(f"\nDICOMweb, {os.cpu_count()} cores, ShardPACS 3 nodes + router (N=3, W=2) vs "
          f"Orthanc {orthanc_version()} + DICOMweb plugin {plugin_version()}; "
          f"run took {time.monotonic() - t_start:.0f} s\n")
    print("| measure | ShardPACS | Orthanc | ShardPACS/Orthanc (>1: ShardPACS better) |")
    print("|---|---|---|---|")
    for label, key, _, higher_better, fmt in rows:
        v1, v2 = sp[key], orr[key]
        ratio = (v1 / v2) if higher_better else (v2 / v1)
        print(f"| {label} | {fmt.format(v1)} | {fmt.format(v2)} | {ratio:.2f} |")


def orthanc_version():
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "orthanc"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def plugin_version():
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"], capture_output=True,
                       text=True)
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    main()
