"""Versions of one SOP Instance UID sent again with different bytes, through
real routers over real nodes (3 nodes, N=3, W=2) with storescu and getscu
(TCP_NODELAY=1): the router's `[dicom] duplicates` policy decides what the
modality hears, the nodes' `[store] max_conflicts` (K) bounds what is kept
aside, and a replica that missed a version converges by repair.

Each version is its own small explicit-VR little endian Secondary Capture
file, sent by its own storescu run so the router's receive times (the
versions nodes order by) increase with the version number.

Run: SP_BUILD_DIR=build /usr/bin/python3 -m pytest -q tests/cluster/test_conflicts.py
"""
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"
K = 2
ROOT = gen.UID_ROOT + ".73"
FAST = {"store_timeout": "5s", "query_timeout": "8s", "fetch_timeout": "8s"}


def make_version(path: Path, study: str, sop: str, v: int) -> Path:
    """Version v of one instance: same UIDs, other comment and pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = gen.SC_IMAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = gen.EXPLICIT_LE
    meta.ImplementationClassUID = ROOT + ".0"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = gen.SC_IMAGE
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "CONFLICT1"
    ds.Modality = "OT"
    ds.PatientName = "Conflict^Versions"
    ds.PatientID = "CONFLICT"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageComments = f"version {v}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((v * 37 + i) % 256 for i in range(256))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.save_as(str(path), write_like_original=False)
    return path


def store_one(router, path: Path) -> int:
    p = sc.dcmtk(["storescu", "-d", "-xe", "-aec", AE, "127.0.0.1", router.port, path],
                 check=False)
    got = sc.store_responses(p.out)
    assert len(got) == 1, p.out[-3000:]
    return got[0][1]


def get_instance(router, out: Path, study: str, sop: str) -> bytes:
    """C-GET of one instance (bit-preserving getscu); its data set bytes."""
    out.mkdir(parents=True, exist_ok=True)
    p = sc.dcmtk(["getscu", "-d", "+B", "-od", out, "-S", "-aec", AE,
                  "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                  "-k", f"SeriesInstanceUID={study}.1", "-k", f"SOPInstanceUID={sop}",
                  "127.0.0.1", router.port], check=False, timeout=120)
    files = list(out.iterdir())
    assert len(files) == 1, p.out[-3000:]
    assert pydicom.dcmread(str(files[0]), stop_before_pixels=True).SOPInstanceUID == sop
    return gen.dataset_bytes_after_meta(files[0])


def digests(c, study):
    """Per node: the digest of the one instance it holds of the study."""
    out = []
    for n in c.nodes:
        held = n.list_study(c.admin_key, study)
        assert len(held) == 1, (n.name, held)
        out.append(next(iter(held.values()))[2])
    return out


def cluster_with(tmp_path, policy):
    return sc.cluster(tmp_path / "cluster", nodes=3, replicas=3, quorum=2, cluster_opts=FAST,
                      node_extra={"store": {"max_conflicts": str(K)}},
                      router_extra={"dicom": {"duplicates": policy}})


# (policy, statuses of versions 1..K+3, which version is retrieved)
CASES = [
    ("reject", [0x0000] + [0x0111] * (K + 2), 1),
    ("keep-first", [0x0000] * (K + 1) + [0x0111] * 2, 1),
    ("keep-newest", [0x0000] * (K + 1) + [0x0111] * 2, K + 1),
]


@pytest.mark.parametrize("policy,want,kept", CASES, ids=[c[0] for c in CASES])
def test_versions_through_the_router(tmp_path, policy, want, kept):
    """K+3 versions: the policy's statuses (0x0111 for every version beyond
    K kept aside, never Success), at most K conflicts and the refusals
    counted on every node, the policy's version retrieved bit-exact, every
    replica holding the same instance; identical re-sends add nothing."""
    study = f"{ROOT}.{len(policy)}.1"
    sop = study + ".1.1"
    files = [make_version(tmp_path / "v" / f"{v}.dcm", study, sop, v) for v in range(1, K + 4)]
    c = cluster_with(tmp_path, policy)
    try:
        got = [store_one(c.router, f) for f in files]
        assert got == want, [hex(s) for s in got]
        for n in c.nodes:
            st = n.stats(c.admin_key)
            assert st["instances"] == 1, (n.name, st)
            assert st["conflicts"] == K, (n.name, st)
            assert st["conflicts_refused"] == 2, (n.name, st)
        data = get_instance(c.router, tmp_path / "got", study, sop)
        assert data == gen.dataset_bytes_after_meta(files[kept - 1])
        assert len(set(digests(c, study))) == 1
        # Re-sends of the stored version and of one kept aside add no copy.
        # A re-send is a new send: under keep-newest the version kept aside
        # becomes the instance again (the last one sent is served).
        assert store_one(c.router, files[kept - 1]) == 0x0000
        assert store_one(c.router, files[1]) == (0x0111 if policy == "reject" else 0x0000)
        assert [n.stats(c.admin_key)["conflicts"] for n in c.nodes] == [K] * 3
        assert [n.stats(c.admin_key)["instances"] for n in c.nodes] == [1] * 3
        data = get_instance(c.router, tmp_path / "got2", study, sop)
        now = files[1] if policy == "keep-newest" else files[kept - 1]
        assert data == gen.dataset_bytes_after_meta(now)
        sc.wait_until(lambda: len(set(digests(c, study))) == 1, 30, "replicas agree")
        log = c.router.log_text()
        if policy != "reject":
            assert f"duplicate: {sop} of study {study} from STORESCU" in log
        assert "refusing SOP " + sop in c.nodes[0].log_text()
    finally:
        c.stop()


def test_keep_newest_replica_that_missed_a_version_converges(tmp_path):
    """n3 is down while version 2 replaces version 1 on n1 and n2 (W=2
    acknowledges it); back up, n3 holds version 1 and repair brings it to
    version 2, the replaced one kept aside there too."""
    study = f"{ROOT}.99.1"
    sop = study + ".1.1"
    v1 = make_version(tmp_path / "v" / "1.dcm", study, sop, 1)
    v2 = make_version(tmp_path / "v" / "2.dcm", study, sop, 2)
    c = cluster_with(tmp_path, "keep-newest")
    try:
        assert store_one(c.router, v1) == 0x0000
        first = digests(c, study)
        assert len(set(first)) == 1
        n3 = c.nodes[2]
        n3.kill9()
        assert store_one(c.router, v2) == 0x0000
        # The router's put to n3 may wait in its ZeroMQ queue and land once
        # n3 is back; stopping the router first leaves n3 only repair.
        c.router.stop()
        n3.restart()
        want = c.nodes[0].list_study(c.admin_key, study)
        assert next(iter(want.values()))[2] != first[0]
        sc.wait_until(lambda: len(set(digests(c, study))) == 1, 60,
                      "n3 converges to version 2")
        assert n3.stats(c.admin_key)["conflicts"] == 1
        assert "by policy keep-newest (repair)" in n3.log_text()
        c.router.start()
        data = get_instance(c.router, tmp_path / "got", study, sop)
        assert data == gen.dataset_bytes_after_meta(v2)
    finally:
        c.stop()
