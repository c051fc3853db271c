"""Studies and queries bigger than one cluster message (issue 9, part 4):
every acknowledged study can be retrieved and listed whatever its size.

One module-scoped cluster: 2 nodes, N=2, W=2 (each study on both nodes, so
every LIST is paged and merged across two nodes), a router with the default
max_results (10000) and a second one with max_results = 100, and a C-MOVE
destination. It holds
* BIG: one study of 20,000 tiny CT instances in 4 series (a node's old
  single LIST reply held about 5,500);
* three small studies of another patient, for a PATIENT-level C-MOVE.
Instances are made by patching fixed-width UIDs into one pydicom template
(seconds for 20,000 files) and sent by 4 storescu processes in parallel.
Measured times are printed (pytest -s shows them); nothing asserts on speed.

Run: /usr/bin/python3 -m pytest -q -s tests/cluster/test_big_studies.py
"""
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"
ROOT = "1.2.826.0.1.3680043.8.498.99"
CT = "1.2.840.10008.5.1.4.1.1.2"
BIG_SERIES = 4
BIG_PER_SERIES = 5000
BIG_COUNT = BIG_SERIES * BIG_PER_SERIES
SMALL_STUDIES = 3
SMALL_PER_STUDY = 30


def study_uid(k):
    return f"{ROOT}.1.{k}"


def series_uid(k, s):
    return f"{ROOT}.2.{k}{s}"


def sop_uid(k, s, i):
    return f"{ROOT}.3.{k}{s}{1000000 + i}"


# Placeholders in the template, each the same length as every value put in
# its place, so patching bytes keeps every element length right.
P_STUDY, P_SERIES, P_SOP = study_uid(9), series_uid(9, 9), sop_uid(9, 9, 0)
P_PID, P_NAME = "PID-X", "PATIENT^X"


def template() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = P_SOP
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = P_SOP
    ds.StudyDate = "20260101"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "BIG1"
    ds.Modality = "CT"
    ds.PatientName = P_NAME
    ds.PatientID = P_PID
    ds.StudyInstanceUID = P_STUDY
    ds.SeriesInstanceUID = P_SERIES
    ds.StudyID = "1"
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.Rows = 4
    ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    ds.is_little_endian, ds.is_implicit_VR = True, False
    path = Path("/tmp") / f"big-template-{id(ds)}.dcm"
    ds.save_as(str(path), write_like_original=False)
    raw = path.read_bytes()
    path.unlink()
    for p in (P_STUDY, P_SERIES, P_PID, P_NAME):
        assert raw.count(p.encode()) == 1, p
    assert raw.count(P_SOP.encode()) == 2  # meta and data set
    return raw


def write_instances(raw: bytes, directory: Path, k, s, count, pid, name):
    directory.mkdir(parents=True, exist_ok=True)
    base = (raw.replace(P_STUDY.encode(), study_uid(k).encode())
            .replace(P_SERIES.encode(), series_uid(k, s).encode())
            .replace(P_PID.encode(), pid.encode())
            .replace(P_NAME.encode(), name.encode()))
    sops = []
    for i in range(count):
        sop = sop_uid(k, s, i)
        (directory / f"{sop}.dcm").write_bytes(base.replace(P_SOP.encode(), sop.encode()))
        sops.append(sop)
    return sops


def storescu_parallel(port, directories):
    procs = [subprocess.Popen(["storescu", "-aec", AE, "+sd", "+r", "127.0.0.1", str(port),
                               str(d)], env=sc.DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for d in directories]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]


class Big:
    def __init__(self, base: Path):
        self.base = base
        raw = template()
        self.src = base / "src"
        self.paths = {}
        dirs = []
        for s in range(1, BIG_SERIES + 1):
            d = self.src / f"big{s}"
            for sop in write_instances(raw, d, 1, s, BIG_PER_SERIES, "PID-B", "PATIENT^B"):
                self.paths[sop] = d / f"{sop}.dcm"
            dirs.append(d)
        self.big = [sop for sop in self.paths]
        self.patient = []
        small_dir = self.src / "patient"
        for k in range(2, 2 + SMALL_STUDIES):
            for sop in write_instances(raw, small_dir, k, 1, SMALL_PER_STUDY, "PID-C",
                                       "PATIENT^C"):
                self.paths[sop] = small_dir / f"{sop}.dcm"
                self.patient.append(sop)
        self.dest = sc.Scp(base / "dest", "DEST")
        self.c = sc.Cluster(base / "cluster", nodes=2, replicas=2, quorum=2,
                            dests={"DEST": self.dest.port},
                            router_extra={"dicom": {"dimse_timeout": "120s"}})
        try:
            r2 = sc.Router(base / "cluster", "router2", self.c.keys, self.c.nodes, replicas=2,
                           quorum=2, extra={"query": {"max_results": "100"}})
            self.c.routers.append(r2)
            self.c._write_keys()
            time.sleep(1.5)  # nodes re-read the key file within a second
            r2.start()
            t0 = time.monotonic()
            storescu_parallel(self.c.router.port, dirs + [small_dir])
            self.ingest_s = time.monotonic() - t0
            print(f"\ningest of {len(self.paths)} instances, 5 associations: "
                  f"{self.ingest_s:.1f} s ({len(self.paths) / self.ingest_s:.0f}/s)")
        except BaseException:
            self.stop()
            raise

    def stop(self):
        self.c.stop()
        self.dest.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    b = Big(tmp_path_factory.mktemp("big"))
    yield b
    b.stop()


def final_status(output):
    st = sc.dimse_statuses(output)
    assert st, output[-3000:]
    return st[-1]


def received(directory: Path):
    """SOP Instance UID -> path of the files getscu/storescp wrote, named
    MODALITY.SOPInstanceUID by their default naming."""
    return {re.sub(r"^[A-Z]+\.", "", p.name).removesuffix(".dcm"): p
            for p in directory.iterdir() if p.is_file()}


def assert_bit_exact(big, files, sample=50):
    for sop in random.Random(7).sample(sorted(files), min(sample, len(files))):
        assert (gen.dataset_bytes_after_meta(files[sop]) ==
                gen.dataset_bytes_after_meta(big.paths[sop])), sop


def test_nodes_hold_the_big_study_whole(big):
    # Through the CLI's paged LIST on each node, not through the router.
    for n in big.c.nodes:
        listed = n.list_study(big.c.admin_key, study_uid(1))
        assert set(listed) == set(big.big), n.name


def test_cget_of_20000_instances(big, tmp_path):
    out = tmp_path / "get"
    out.mkdir()
    t0 = time.monotonic()
    p = sc.dcmtk(["getscu", "-d", "+B", "-od", out, "-S", "-aec", AE,
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid(1)}",
                  "127.0.0.1", big.c.router.port], check=False, timeout=600)
    took = time.monotonic() - t0
    print(f"\nC-GET of {BIG_COUNT} instances: {took:.1f} s ({BIG_COUNT / took:.0f}/s)")
    assert final_status(p.out) == 0x0000, p.out[-3000:]
    files = received(out)
    assert set(files) == set(big.big)
    assert_bit_exact(big, files)


def test_cmove_of_20000_instances(big):
    big.dest.clear()
    t0 = time.monotonic()
    p = sc.dcmtk(["movescu", "-v", "-S", "-aec", AE, "-aem", "DEST",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid(1)}",
                  "127.0.0.1", big.c.router.port], check=False, timeout=600)
    took = time.monotonic() - t0
    print(f"\nC-MOVE of {BIG_COUNT} instances: {took:.1f} s ({BIG_COUNT / took:.0f}/s)")
    assert re.search(r"Received Final Move Response \(Success\)", p.out), p.out[-3000:]
    files = received(big.dest.dir)
    assert set(files) == set(big.big)
    assert_bit_exact(big, files)


def test_series_level_cget_of_one_big_series(big, tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    p = sc.dcmtk(["getscu", "+B", "-od", out, "-S", "-aec", AE,
                  "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid(1)}",
                  "-k", f"SeriesInstanceUID={series_uid(1, 3)}",
                  "127.0.0.1", big.c.router.port], check=False, timeout=600)
    files = received(out)
    assert set(files) == {sop_uid(1, 3, i) for i in range(BIG_PER_SERIES)}, p.out[-2000:]


def test_patient_level_cmove_of_several_studies(big):
    big.dest.clear()
    p = sc.dcmtk(["movescu", "-d", "-P", "-aec", AE, "-aem", "DEST",
                  "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PID-C",
                  "127.0.0.1", big.c.router.port], check=False, timeout=300)
    assert final_status(p.out) == 0x0000, p.out[-3000:]
    files = received(big.dest.dir)
    assert set(files) == set(big.patient)
    assert_bit_exact(big, files, sample=10)


def find_count(router, args, timeout=300):
    """findscu -d; returns (final DIMSE status, pending responses, output)."""
    p = sc.dcmtk(["findscu", "-d", "-S", "-aec", AE, *args, "127.0.0.1", router.port],
                 check=False, timeout=timeout)
    statuses = sc.dimse_statuses(p.out)
    assert statuses, p.out[-3000:]
    return statuses[-1], statuses.count(0xFF00), p.out


def test_broad_cfind_stops_at_max_results_over_a_megabyte(big):
    # 20,000 IMAGE matches; the default cap (10000) with about 1.5 MB of
    # results: exactly 10000 pending responses, then 0xA700 with a comment.
    status, pending, out = find_count(big.c.router, [
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid(1)}",
        "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID", "-k", "SOPClassUID",
        "-k", "InstanceNumber", "-k", "PatientName", "-k", "StudyDate"])
    assert status == 0xA700, hex(status)
    assert pending == 10000
    assert "C-FIND from FINDSCU stopped at 10000 matches" in big.c.router.log_text()


def test_broad_cfind_with_small_max_results(big):
    r2 = big.c.routers[1]
    status, pending, out = find_count(r2, [
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid(1)}",
        "-k", "SOPInstanceUID"])
    assert status == 0xA700, hex(status)
    assert pending == 100
    # The Error Comment (0000,0902) in the final response's status detail.
    assert "more than 100 matches; narrow the query" in out, out[-2000:]
    # Fewer matches than the cap: all of them, Success.
    status, pending, _ = find_count(r2, [
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PID-C", "-k", "StudyInstanceUID"])
    assert status == 0x0000, hex(status)
    assert pending == SMALL_STUDIES


def query_file(path: Path, sops):
    """A C-FIND/C-GET identifier with a SOP Instance UID list, as a file
    (a list of thousands does not fit one command-line argument), implicit
    VR so the element length is not bound to 16 bits."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid(1)
    ds.SeriesInstanceUID = ""
    ds.SOPInstanceUID = list(sops)
    ds.is_little_endian, ds.is_implicit_VR = True, True
    ds.save_as(str(path), write_like_original=True)  # a bare data set, no meta
    return path


@pytest.mark.parametrize("count", [500, 5000])
def test_cfind_with_a_long_sop_uid_list(big, tmp_path, count):
    sops = random.Random(count).sample(big.big, count)
    assert len("\\".join(sops)) > 1024
    q = query_file(tmp_path / "q.dcm", sops)
    outdir = tmp_path / "rsp"
    outdir.mkdir()
    p = sc.dcmtk(["findscu", "-v", "-S", "-xi", "-aec", AE, "-X", "-od", outdir,
                  "127.0.0.1", big.c.router.port, q], check=False, timeout=300)
    m = re.search(r"Received Final Find Response \(([^)]*)\)", p.out)
    assert m and m.group(1).lower().startswith("success"), p.out[-3000:]
    got = [r["SOPInstanceUID"] for r in gen.read_findscu_responses(outdir)]
    assert len(got) == count
    assert set(got) == set(sops)


def test_cget_with_a_long_sop_uid_list(big, tmp_path):
    sops = random.Random(3).sample(big.big, 2000)
    q = query_file(tmp_path / "q.dcm", sops)
    out = tmp_path / "get"
    out.mkdir()
    p = sc.dcmtk(["getscu", "+B", "-od", out, "-S", "-xi", "-aec", AE,
                  "127.0.0.1", big.c.router.port, q], check=False, timeout=300)
    files = received(out)
    assert set(files) == set(sops), p.out[-3000:]
