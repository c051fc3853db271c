"""End-to-end tests of shardpacs-router over real storage nodes, driven by
DCMTK's own clients (echoscu, storescu, findscu, movescu, getscu, storescp;
all with TCP_NODELAY=1) and, for malformed requests, by a raw DICOM client.

Layout:
* `ref`: the deterministic test set (tests/cluster/dataset.py: 48 instances,
  11 studies, 6 transfer syntaxes, 3 character sets) sent once by storescu
  to a bit-preserving storescp. storescu re-encodes what it sends, so these
  received bytes, not the files on disk, are the reference for every
  "retrieved == stored" comparison (data set after the file meta header).
* `main`: one module-scoped cluster (3 nodes, N=3, W=2, two routers, a C-MOVE
  destination DEST) holding the whole set, stored once with the same
  storescu invocations; the read-only tests share it.
* Destructive tests (nodes or a router killed, conflicts) each get their own
  small cluster.

Run: /usr/bin/python3 -m pytest -q tests/cluster/test_router.py
(programs from SP_BUILD_DIR, by default the repository's build/)
"""
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"
# Stores give up quickly; query and fetch timeouts are long, so a retrieve
# that waits on a dead node is unmistakable (a whole 8 s) even on a slow
# machine, while one that skips it takes well under a second.
FAST = {"store_timeout": "2s", "query_timeout": "8s", "fetch_timeout": "8s",
        "retry_down": "60s"}

def is_failure(status):
    """PS3.7 C: failure statuses are 0xA..., 0xC... and the 0x01.. general
    failures (0x0110 Processing failure, 0x0111 Duplicate SOP Instance, ...)."""
    return status >> 12 in (0xA, 0xC) or 0x0100 <= status <= 0x01FF


# ---- shared data and reference ----------------------------------------------------------

class Ref:
    """The test set and what a bit-preserving storescp received of it."""

    def __init__(self, base: Path):
        self.ds = gen.make_test_set(base / "testset")
        self.scp = sc.Scp(base / "ref", "REF")
        for option, paths in self.ds.storescu_batches():
            sc.dcmtk(["storescu", option, "-aec", "REF", "127.0.0.1", self.scp.port, *paths])
        self.scp.stop()
        self.files = self.scp.files()
        self.bytes = {uid: gen.dataset_bytes_after_meta(p) for uid, p in self.files.items()}
        self.ts = {uid: str(pydicom.dcmread(str(p), stop_before_pixels=True)
                            .file_meta.TransferSyntaxUID) for uid, p in self.files.items()}

    def uids(self, **match):
        """SOP Instance UIDs of the records whose attributes equal `match`."""
        return sorted(r["SOPInstanceUID"] for r in self.ds.instances()
                      if all(r[k] == v for k, v in match.items()))

    def paths(self, uids):
        uids = set(uids)
        return [Path(r["path"]) for r in self.ds.instances() if r["SOPInstanceUID"] in uids]

    def batches(self, uids=None):
        """storescu_batches() restricted to some instances."""
        keep = None if uids is None else {str(p) for p in self.paths(uids)}
        out = []
        for option, paths in self.ds.storescu_batches():
            paths = [p for p in paths if keep is None or str(p) in keep]
            if paths:
                out.append((option, paths))
        return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    r = Ref(tmp_path_factory.mktemp("ref"))
    assert len(r.files) == len(r.ds) == 48
    assert r.ts == {x["SOPInstanceUID"]: x["TransferSyntaxUID"] for x in r.ds.instances()}
    return r


def store(router, batches, check=True, timeout=120):
    """Sends (storescu option, paths) batches to a router, one storescu
    invocation per batch; returns [(SOP Instance UID, status)] in order."""
    responses = []
    for option, paths in batches:
        p = sc.dcmtk(["storescu", "-d", option, "-aec", AE, "127.0.0.1", router.port, *paths],
                     check=False, timeout=timeout)
        got = sc.store_responses(p.out)
        if check:
            assert p.returncode == 0 and len(got) == len(paths), p.out[-4000:]
        responses += got
    return responses


def assert_all_success(responses, want_uids):
    bad = [(u, hex(s)) for u, s in responses if s != 0]
    assert not bad, bad
    assert sorted(u for u, _ in responses) == sorted(want_uids)


def check_received(ref, received: dict, want_uids, converted_ok=False):
    """received (uid -> file) holds exactly want_uids, each byte for byte the
    data set the reference storescp got (and in its transfer syntax). With
    converted_ok, a file in another transfer syntax (C-GET of a syntax getscu
    does not accept) is compared by content instead. Returns how many were
    compared byte for byte."""
    assert sorted(received) == sorted(want_uids)
    exact = 0
    for uid, path in received.items():
        got_ts = str(pydicom.dcmread(str(path), stop_before_pixels=True)
                     .file_meta.TransferSyntaxUID)
        if got_ts == ref.ts[uid]:
            got = gen.dataset_bytes_after_meta(path)
            want = ref.bytes[uid]
            assert got == want, f"{uid}: {len(got)} bytes retrieved differ from the " \
                                f"{len(want)} stored"
            exact += 1
        else:
            assert converted_ok, f"{uid}: retrieved in {got_ts}, stored in {ref.ts[uid]}"
            got = pydicom.dcmread(str(path))
            want = pydicom.dcmread(str(ref.files[uid]))
            assert not got.file_meta.TransferSyntaxUID.is_compressed
            compressed = want.file_meta.TransferSyntaxUID.is_compressed
            for elem in want:
                # decompression may change the image pixel module (colour model)
                if elem.tag != 0x7FE00010 and not (compressed and elem.tag.group == 0x0028):
                    assert got[elem.tag].value == elem.value, (uid, elem.keyword)
            assert (got.Rows, got.Columns) == (want.Rows, want.Columns)
            if not compressed:
                assert got.PixelData == want.PixelData, uid
            else:
                assert len(got.PixelData) == want.Rows * want.Columns * \
                    want.SamplesPerPixel * want.BitsAllocated // 8
    return exact


def echo(router):
    p = sc.dcmtk(["echoscu", "-v", "-aec", AE, "127.0.0.1", router.port], timeout=20)
    assert "Received Echo Response (Success)" in p.out


def final_status(output):
    st = sc.dimse_statuses(output)
    assert st, output[-3000:]
    return st[-1]


def move(router, dest_ae, level, keys, model="-S", check=True):
    """movescu; returns (final status, output)."""
    args = ["movescu", "-d", model, "-aec", AE, "-aem", dest_ae,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    p = sc.dcmtk(args + ["127.0.0.1", router.port], check=False, timeout=120)
    status = final_status(p.out)
    if check:
        assert status == 0x0000, (hex(status), p.out[-3000:])
    return status, p.out


def get(router, out: Path, level, keys, model="-S", extra=()):
    """getscu (bit-preserving) into out; returns (final status, {uid: path}, output)."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", "+B", "-od", out, model, "-aec", AE, *extra,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    p = sc.dcmtk(args + ["127.0.0.1", router.port], check=False, timeout=120)
    files = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: f
             for f in out.iterdir()}
    return final_status(p.out), files, p.out


def subops(output):
    """(completed, failed, warning) of the last C-MOVE/C-GET response."""
    def last(name):
        vals = re.findall(name + r"\s*:\s*(\d+)", output)
        return int(vals[-1]) if vals else None
    return (last("Completed Suboperations"), last("Failed Suboperations"),
            last("Warning Suboperations"))


def find(router, level, keys, outdir, model="-S"):
    """findscu -X; returns (final status, [response dicts])."""
    outdir.mkdir(parents=True, exist_ok=True)
    for p in outdir.glob("rsp*.dcm"):
        p.unlink()
    args = ["findscu", "-v", model, "-aec", AE, "-X", "-od", outdir,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        if isinstance(v, bytes):
            args += ["-k", k.encode() + b"=" + v]
        else:
            args += ["-k", f"{k}={v}" if v not in (None, "") else k]
    p = sc.dcmtk(args + ["127.0.0.1", router.port], timeout=60)
    m = re.search(r"Received Final Find Response \(([^)]*)\)", p.out)
    assert m, p.out[-3000:]
    return m.group(1), gen.read_findscu_responses(outdir)


def node_instances(c, node):
    return node.stats(c.admin_key)["instances"]


# ---- the module cluster --------------------------------------------------------------------

@pytest.fixture(scope="module")
def main(ref, tmp_path_factory):
    base = tmp_path_factory.mktemp("main")
    dest = sc.Scp(base / "dest", "DEST")
    c = sc.cluster(base / "cluster", nodes=3, replicas=3, quorum=2, routers=2,
                   dests={"DEST": dest.port, "DEAD": sc.free_port()},
                   cluster_opts={"store_timeout": "10s", "query_timeout": "10s",
                                 "fetch_timeout": "10s"})
    t0 = time.monotonic()
    responses = store(c.router, ref.batches())
    store_seconds = time.monotonic() - t0
    # W=2 answers before the third copy lands. Tests that count or read every
    # node's objects start once all 3 hold the whole set (asserted by
    # test_store_whole_set_is_acknowledged_and_replicated), whichever runs first.
    deadline = time.monotonic() + 10
    while any(node_instances(c, n) != 48 for n in c.nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    yield {"c": c, "dest": dest, "responses": responses, "store_seconds": store_seconds,
           "base": base}
    alive = {r.name: r.alive() for r in c.routers}
    rcs = c.stop()
    dest.stop()
    assert all(alive.values()), alive
    assert all(rc == 0 for rc in rcs.values()), (rcs, c.router.log_text()[-3000:])


def test_echo_both_routers(main):
    for r in main["c"].routers:
        echo(r)


def test_store_whole_set_is_acknowledged_and_replicated(main, ref):
    c = main["c"]
    assert_all_success(main["responses"], ref.uids())
    # N=3 on 3 nodes: every node ends up with every instance (W=2 answers
    # early; the third copy follows)
    deadline = time.monotonic() + 10
    while any(node_instances(c, n) != 48 for n in c.nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [node_instances(c, n) for n in c.nodes] == [48, 48, 48]
    for n in c.nodes:
        assert n.stats(c.admin_key)["conflicts"] == 0
    # every replica holds the same object in the transfer syntax it was sent in
    for study in {r["StudyInstanceUID"] for r in ref.ds.instances()}:
        copies = [n.list_study(c.admin_key, study) for n in c.nodes]
        assert copies[0] == copies[1] == copies[2], study
        for uid, (ts, _size, _digest) in copies[0].items():
            assert ts == ref.ts[uid]
        assert sorted(copies[0]) == ref.uids(StudyInstanceUID=study)


def test_stored_objects_are_the_received_bytes(main, ref, tmp_path):
    """What a node holds (read with the operator CLI) is a Part-10 object whose
    data set is byte for byte what storescu sent."""
    c = main["c"]
    node = c.nodes[1]
    for uid in ref.uids():
        out = tmp_path / "obj.dcm"
        node.cli(c.admin_key, "get", uid, out)
        f = pydicom.dcmread(str(out), stop_before_pixels=True)
        assert f.file_meta.MediaStorageSOPInstanceUID == uid
        assert f.file_meta.TransferSyntaxUID == ref.ts[uid]
        assert gen.dataset_bytes_after_meta(out) == ref.bytes[uid], uid


# ---- C-FIND -----------------------------------------------------------------------------

STUDY_ALL = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "PatientBirthDate": "",
             "PatientSex": "", "StudyDate": "", "StudyTime": "", "AccessionNumber": "",
             "StudyID": "", "ReferringPhysicianName": "", "StudyDescription": "",
             "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
             "NumberOfStudyRelatedInstances": ""}
UTF8 = {"SpecificCharacterSet": "ISO_IR 192"}
S = "StudyInstanceUID"


def _study(pid, n, seed=0):
    return f"{gen.TEST_ROOT}.{seed}.1.{int(pid[-1])}.{n}"


# (id, level, keys, model); expected results come from DataSet.expected_find
# with case-insensitive person names (the router's default)
FIND_CASES = [
    # universal matching: every study with every value (Latin-1 converted to UTF-8)
    ("study-universal", "STUDY", STUDY_ALL, "-S"),
    # single value matching
    ("study-single-id", "STUDY", {"PatientID": "SPT0001", S: "", "StudyDescription": "",
                                  "ReferringPhysicianName": "", "StudyTime": ""}, "-S"),
    ("study-single-none", "STUDY", {"PatientID": "NOBODY", S: ""}, "-S"),
    ("study-single-accession", "STUDY", {"AccessionNumber": "ACC22-0630", S: "",
                                         "PatientName": ""}, "-S"),
    # wildcards, case-insensitive person names
    ("study-wild-star", "STUDY", {"PatientName": "Doe*", S: "", "PatientID": ""}, "-S"),
    ("study-pn-case", "STUDY", {"PatientName": "doe^john", S: ""}, "-S"),
    ("study-wild-accession", "STUDY", {"AccessionNumber": "ACC2?-*", S: "",
                                       "StudyDate": ""}, "-S"),
    ("study-desc-not-pn", "STUDY", {"StudyDescription": "ct head*", S: ""}, "-S"),
    ("study-desc-exact-case", "STUDY", {"StudyDescription": "CT HEAD*", S: ""}, "-S"),
    ("study-referring", "STUDY", {"ReferringPhysicianName": "Doe^John", S: "",
                                  "PatientName": ""}, "-S"),
    # non-ASCII values (UTF-8 in the query): ? is one character
    ("study-utf8-question", "STUDY", dict(UTF8, PatientName="M?ller^J?rgen", **{S: ""},
                                          StudyDescription=""), "-S"),
    ("study-utf8-prefix", "STUDY", dict(UTF8, PatientName="Ñ*", **{S: ""},
                                        ReferringPhysicianName=""), "-S"),
    ("study-utf8-cyrillic", "STUDY", dict(UTF8, PatientName="*^Анна", **{S: ""},
                                          StudyDescription=""), "-S"),
    ("study-utf8-greek", "STUDY", dict(UTF8, PatientName="Παπα*", **{S: ""}), "-S"),
    # case folding of names covers ASCII and Latin-1 (common/match.c)
    ("study-utf8-latin1-case", "STUDY", dict(UTF8, PatientName="müller^jürgen", **{S: ""}),
     "-S"),
    ("study-utf8-desc", "STUDY", dict(UTF8, StudyDescription="CT Schädel*", **{S: ""}), "-S"),
    # date and time ranges
    ("study-date-range", "STUDY", {"StudyDate": "20210101-20221231", S: ""}, "-S"),
    ("study-date-upto", "STUDY", {"StudyDate": "-20000101", S: ""}, "-S"),
    ("study-date-from", "STUDY", {"StudyDate": "20240101-", S: "", "StudyTime": ""}, "-S"),
    ("study-date-single", "STUDY", {"StudyDate": "20230704", S: ""}, "-S"),
    ("study-time-range", "STUDY", {"StudyTime": "0800-0930", S: "", "StudyDate": ""}, "-S"),
    ("study-time-hours", "STUDY", {"StudyTime": "14-16", S: ""}, "-S"),
    ("study-date-and-sex", "STUDY", {"StudyDate": "20230101-20231231", "PatientSex": "F",
                                     S: ""}, "-S"),
    ("study-birth-range", "STUDY", {"PatientBirthDate": "-19601231", S: ""}, "-S"),
    # UID lists (a C-FIND naming studies goes to their replicas only)
    ("study-uid-list", "STUDY", {S: f"{_study('SPT0001', 1)}\\{_study('SPT0005', 2)}",
                                 "PatientName": "", "NumberOfStudyRelatedInstances": ""},
     "-S"),
    ("study-uid-unknown", "STUDY", {S: _study("SPT0001", 1)[:-1] + "9", "PatientName": ""},
     "-S"),
    ("study-modalities", "STUDY", {"ModalitiesInStudy": "OT\\SR", S: ""}, "-S"),
    # PATIENT level, Patient Root model
    ("patient-universal", "PATIENT", {"PatientID": "", "PatientName": "", "PatientBirthDate": "",
                                      "PatientSex": "", "NumberOfPatientRelatedStudies": "",
                                      "NumberOfPatientRelatedSeries": "",
                                      "NumberOfPatientRelatedInstances": ""}, "-P"),
    ("patient-question", "PATIENT", {"PatientID": "SPT000?", "PatientName": ""}, "-P"),
    ("patient-sex", "PATIENT", {"PatientSex": "F", "PatientID": "", "PatientName": ""}, "-P"),
    ("patient-birth", "PATIENT", {"PatientBirthDate": "19800101-19951231", "PatientID": ""},
     "-P"),
    # SERIES level
    ("series-of-study", "SERIES", {S: _study("SPT0001", 1), "SeriesInstanceUID": "",
                                   "Modality": "", "SeriesNumber": "", "SeriesDescription": "",
                                   "NumberOfSeriesRelatedInstances": ""}, "-S"),
    ("series-modality", "SERIES", {"Modality": "SR", "SeriesInstanceUID": "", S: ""}, "-S"),
    ("series-number", "SERIES", {"SeriesNumber": "99", "SeriesInstanceUID": "",
                                         "SeriesDescription": ""}, "-S"),
    ("series-desc-nonempty", "SERIES", {"SeriesDescription": "?*", "SeriesInstanceUID": ""},
     "-S"),
    ("series-universal", "SERIES", {"SeriesInstanceUID": "", "SeriesDescription": "",
                                    "Modality": "", "NumberOfSeriesRelatedInstances": ""},
     "-S"),
    ("series-utf8", "SERIES", dict(UTF8, SeriesDescription="*αξονική*", SeriesInstanceUID=""),
     "-S"),
    # IMAGE level
    ("image-of-study", "IMAGE", {S: _study("SPT0003", 1), "SOPInstanceUID": "",
                                 "SOPClassUID": "", "InstanceNumber": "",
                                 "SeriesInstanceUID": ""}, "-S"),
    ("image-class-list", "IMAGE", {"SOPClassUID": f"{gen.SC_IMAGE}\\{gen.BASIC_TEXT_SR}",
                                   "SOPInstanceUID": ""}, "-S"),
    ("image-number", "IMAGE", {"InstanceNumber": "3", "SOPInstanceUID": "",
                               "SeriesInstanceUID": ""}, "-S"),
    ("image-all", "IMAGE", {"SOPInstanceUID": "", "SOPClassUID": "", "StudyInstanceUID": "",
                            "PatientID": ""}, "-S"),
]
UNIQUE = {"PATIENT": "PatientID", "STUDY": S, "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
MULTI = {"ModalitiesInStudy", "SOPClassesInStudy"}


def _norm(rec):
    return {k: "\\".join(sorted(v.split("\\"))) if k in MULTI else v for k, v in rec.items()}


def expected(ref, level, keys):
    return [_norm(r) for r in ref.ds.expected_find(level, keys, pn_case_insensitive=True,
                                                   project=True)]


def got_records(level, keys, responses):
    want_keys = {k for k in keys if k not in gen.NOT_MATCHING}
    out = []
    for r in responses:
        extra = set(r) - want_keys - {"SpecificCharacterSet", "QueryRetrieveLevel"}
        assert not extra, f"response carries keys not asked for: {extra}"
        assert r.get("QueryRetrieveLevel") == level
        assert r.get("SpecificCharacterSet") == "ISO_IR 192"
        out.append(_norm({k: r.get(k, "<missing>") for k in want_keys}))
    return sorted(out, key=lambda x: x[UNIQUE[level]] if UNIQUE[level] in x else "")


@pytest.mark.parametrize("case", FIND_CASES, ids=[c[0] for c in FIND_CASES])
def test_find_matches_expected(main, ref, tmp_path, case):
    _, level, keys, model = case
    status, rsps = find(main["c"].router, level, keys, tmp_path / "f", model)
    assert status == "Success"
    want = expected(ref, level, keys)
    got = got_records(level, keys, rsps)
    if UNIQUE[level] not in keys:
        got = sorted(got, key=lambda x: sorted(x.items()))
        want = sorted(want, key=lambda x: sorted(x.items()))
    assert got == want
    if case[0] not in ("study-single-none", "study-uid-unknown", "study-desc-not-pn"):
        assert got, "a case meant to match something matched nothing"


def test_find_latin1_query(main, ref, tmp_path):
    """A query in ISO_IR 100 (Latin-1 bytes on the wire) matches the Latin-1
    and the UTF-8 patients alike; answers come in UTF-8."""
    for text, charset in (("*ü*", "ISO_IR 100"), ("Lef?vre^Am?lie", "ISO_IR 100"),
                          ("*é*", "ISO_IR 100")):
        keys = {"SpecificCharacterSet": charset, "PatientName": text.encode("latin-1"),
                S: "", "PatientID": ""}
        status, rsps = find(main["c"].router, "STUDY", keys, tmp_path / "l", "-S")
        assert status == "Success"
        plain = dict(keys, PatientName=text)
        want = expected(ref, "STUDY", plain)
        assert want, text
        assert got_records("STUDY", plain, rsps) == want, text


def test_find_universal_sizes(main, ref, tmp_path):
    """The universal queries really return the whole set at each level."""
    r = main["c"].router
    for level, key, model, n in (("PATIENT", "PatientID", "-P", 7), ("STUDY", S, "-S", 11),
                                 ("SERIES", "SeriesInstanceUID", "-S", 22),
                                 ("IMAGE", "SOPInstanceUID", "-S", 48)):
        status, rsps = find(r, level, {key: ""}, tmp_path / level, model)
        assert status == "Success" and len(rsps) == n, (level, len(rsps))
        assert len({x[key] for x in rsps}) == n  # merged without duplicates


def test_two_routers_give_the_same_find_answers(main, tmp_path):
    c = main["c"]
    for i, (_, level, keys, model) in enumerate(FIND_CASES[::3]):
        a = find(c.routers[0], level, keys, tmp_path / f"a{i}", model)
        b = find(c.routers[1], level, keys, tmp_path / f"b{i}", model)
        assert a == b, (level, keys)


# ---- C-MOVE and C-GET ------------------------------------------------------------------

def test_move_studies_bit_exact(main, ref):
    dest = main["dest"]
    dest.clear()
    a, b = _study("SPT0001", 1), _study("SPT0003", 1)  # ele, ile, rle, jll, jls
    status, out = move(main["c"].router, "DEST", "STUDY", {S: f"{a}\\{b}"})
    want = ref.uids(StudyInstanceUID=a) + ref.uids(StudyInstanceUID=b)
    assert check_received(ref, dest.files(), want) == len(want)
    assert subops(out)[:2] == (len(want), 0)


def test_move_whole_set_bit_exact(main, ref):
    dest = main["dest"]
    dest.clear()
    studies = sorted({r[S] for r in ref.ds.instances()})
    move(main["c"].routers[1], "DEST", "STUDY", {S: "\\".join(studies)})
    assert check_received(ref, dest.files(), ref.uids()) == 48


def test_move_series_bit_exact(main, ref):
    dest = main["dest"]
    dest.clear()
    rec = ref.ds.record(ref.uids(SeriesDescription="PD fettgesättigt")[0])  # JPEG-LS
    other = ref.ds.record(ref.uids(SeriesDescription="T1 sagittal")[0])     # implicit VR
    move(main["c"].router, "DEST", "SERIES",
         {S: rec[S], "SeriesInstanceUID": f"{rec['SeriesInstanceUID']}\\"
                                          f"{other['SeriesInstanceUID']}"})
    want = ref.uids(SeriesInstanceUID=rec["SeriesInstanceUID"]) + \
        ref.uids(SeriesInstanceUID=other["SeriesInstanceUID"])
    assert len(want) == 6
    assert check_received(ref, dest.files(), want) == 6


def test_move_single_instances_bit_exact(main, ref):
    dest = main["dest"]
    for ts in (gen.JPEG_BASELINE, gen.IMPLICIT_LE, gen.RLE_LOSSLESS):
        dest.clear()
        rec = next(r for r in ref.ds.instances() if r["TransferSyntaxUID"] == ts)
        move(main["c"].router, "DEST", "IMAGE",
             {S: rec[S], "SeriesInstanceUID": rec["SeriesInstanceUID"],
              "SOPInstanceUID": rec["SOPInstanceUID"]})
        assert check_received(ref, dest.files(), [rec["SOPInstanceUID"]]) == 1


def test_move_patient_root_patient_level(main, ref):
    dest = main["dest"]
    dest.clear()
    move(main["c"].router, "DEST", "PATIENT", {"PatientID": "SPT0005"}, model="-P")
    want = ref.uids(PatientID="SPT0005")
    assert len(want) == 8
    assert check_received(ref, dest.files(), want) == 8


def test_get_study_bit_exact(main, ref, tmp_path):
    study = _study("SPT0004", 1)  # explicit VR and RLE
    status, files, out = get(main["c"].router, tmp_path / "g", "STUDY", {S: study})
    assert status == 0x0000, out[-3000:]
    want = ref.uids(StudyInstanceUID=study)
    # getscu 3.6.7 accepts explicit VR little endian only: the RLE instance
    # comes converted, the rest byte for byte
    exact = check_received(ref, files, want, converted_ok=True)
    assert exact == len([u for u in want if ref.ts[u] == gen.EXPLICIT_LE]) >= 3


def test_get_series_and_instance_bit_exact(main, ref, tmp_path):
    rec = ref.ds.record(ref.uids(SeriesDescription="Лёгкие")[0])  # 3 x explicit VR
    status, files, out = get(main["c"].router, tmp_path / "s", "SERIES",
                             {S: rec[S], "SeriesInstanceUID": rec["SeriesInstanceUID"]})
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, files, ref.uids(SeriesInstanceUID=rec["SeriesInstanceUID"])) == 3
    sr = next(r for r in ref.ds.instances()
              if r["SOPClassUID"] == gen.BASIC_TEXT_SR and r["TransferSyntaxUID"] ==
              gen.EXPLICIT_LE)  # undefined-length sequences
    status, files, out = get(main["c"].router, tmp_path / "i", "IMAGE",
                             {S: sr[S], "SeriesInstanceUID": sr["SeriesInstanceUID"],
                              "SOPInstanceUID": sr["SOPInstanceUID"]})
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, files, [sr["SOPInstanceUID"]]) == 1
    ile = next(r for r in ref.ds.instances() if r["TransferSyntaxUID"] == gen.IMPLICIT_LE)
    status, files, out = get(main["c"].router, tmp_path / "j", "IMAGE",
                             {S: ile[S], "SeriesInstanceUID": ile["SeriesInstanceUID"],
                              "SOPInstanceUID": ile["SOPInstanceUID"]})
    assert status == 0x0000, out[-3000:]
    check_received(ref, files, [ile["SOPInstanceUID"]], converted_ok=True)


def test_retrieve_of_nothing(main, ref, tmp_path):
    status, files, out = get(main["c"].router, tmp_path / "n", "STUDY",
                             {S: "1.2.826.0.1.3680043.8.498.99999"})
    assert status == 0x0000 and files == {}, out[-3000:]
    assert subops(out)[:2] in ((0, 0), (None, None))


def test_move_unknown_destination(main):
    status, out = move(main["c"].router, "NOWHERE", "STUDY", {S: _study("SPT0001", 1)},
                       check=False)
    assert status == 0xA801, out[-3000:]


def test_move_unreachable_destination(main):
    status, out = move(main["c"].router, "DEAD", "STUDY", {S: _study("SPT0001", 1)},
                       check=False)
    assert status == 0xA702, out[-3000:]


def test_move_without_unique_key(main):
    status, out = move(main["c"].router, "DEST", "SERIES", {S: _study("SPT0001", 1)},
                       check=False)
    assert is_failure(status), (hex(status), out[-3000:])


# ---- stores that must fail, and idempotent ones -----------------------------------------

def _image(study=None, series=None, pid="BAD001", name="Bad^Request"):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.SOPClassUID = gen.CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = name
    ds.PatientID = pid
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.Rows = 16
    ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * 2
    return ds


def _save(ds, path):
    from pydicom.dataset import FileMetaDataset
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = gen.EXPLICIT_LE
    ds.file_meta = fm
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.save_as(str(path), write_like_original=False)
    return path


def _counts(c):
    return [node_instances(c, n) for n in c.nodes]


def _nothing_stored(c, tmp_path, pid, counts):
    status, rsps = find(c.router, "PATIENT", {"PatientID": pid}, tmp_path / "chk", "-P")
    assert status == "Success" and rsps == [], rsps
    assert _counts(c) == counts, "a refused C-STORE left an instance behind"


@pytest.mark.parametrize("cut", ["in-pixel-data", "in-element-header", "in-uid-value",
                                 "garbage"])
def test_store_malformed_data_set_is_refused(main, tmp_path, cut):
    """Truncated or garbage data sets (even lengths, so they reach the
    parser) get a failure status and leave nothing behind."""
    c = main["c"]
    counts = _counts(c)
    ds = _image(pid="BAD-" + cut)
    raw = sc.encode_dataset(ds)
    pixel_at = raw.index(b"\xe0\x7f\x10\x00")
    if cut == "in-pixel-data":
        bad = raw[:pixel_at + 8 + 100]                 # length says 512, 100 follow
    elif cut == "in-element-header":
        bad = raw[:pixel_at + 6]                       # tag and half a length
    elif cut == "in-uid-value":
        at = raw.index(ds.SeriesInstanceUID.encode())
        bad = raw[:at + 6]                             # in the Series Instance UID
    else:
        bad = bytes(range(7, 255)) * 3
    assert len(bad) % 2 == 0
    status, comment = sc.raw_store(c.router.port, gen.CT_IMAGE, ds.SOPInstanceUID, bad)
    assert status is not None and is_failure(status), (status, comment)
    assert status == 0xC000 or status >> 8 == 0xA9, (hex(status), comment)
    _nothing_stored(c, tmp_path, "BAD-" + cut, counts)
    echo(c.router)


def test_store_odd_length_data_set_does_not_hurt(main, tmp_path):
    """An odd-length data set breaks the PDV rules: refusing or aborting are
    both fine, storing is not, and the router carries on."""
    c = main["c"]
    counts = _counts(c)
    ds = _image(pid="BAD-ODD")
    raw = sc.encode_dataset(ds)
    status, comment = sc.raw_store(c.router.port, gen.CT_IMAGE, ds.SOPInstanceUID, raw[:-1])
    assert status is None or is_failure(status), (status, comment)
    _nothing_stored(c, tmp_path, "BAD-ODD", counts)
    echo(c.router)


def test_store_missing_uids_is_refused(main, tmp_path):
    c = main["c"]
    counts = _counts(c)
    # missing SOP Instance UID in the data set (storescu cannot send that)
    ds = _image(pid="BAD-NOSOP")
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    status, comment = sc.raw_store(c.router.port, gen.CT_IMAGE, uid, sc.encode_dataset(ds))
    assert status == 0xC000 and "SOPInstanceUID" in comment, (hex(status), comment)
    # SOP Instance UID of the data set differs from the command's
    ds = _image(pid="BAD-NOSOP")
    status, comment = sc.raw_store(c.router.port, gen.CT_IMAGE, generate_uid(),
                                   sc.encode_dataset(ds))
    assert status == 0xA900, (hex(status), comment)
    # missing Study / Series Instance UID, with storescu
    for attr, pid in (("StudyInstanceUID", "BAD-NOSTUDY"), ("SeriesInstanceUID", "BAD-NOSER")):
        ds = _image(pid=pid)
        delattr(ds, attr)
        path = _save(ds, tmp_path / f"{pid}.dcm")
        p = sc.dcmtk(["storescu", "-d", "-aec", AE, "127.0.0.1", c.router.port, path],
                     check=False)
        (got_uid, status), = sc.store_responses(p.out)
        assert got_uid == ds.SOPInstanceUID and status == 0xC000, (hex(status), p.out[-2000:])
        assert attr in p.out  # the Error Comment names it
        _nothing_stored(c, tmp_path, pid, counts)
    # empty Study Instance UID (present, zero length)
    ds = _image(pid="BAD-EMPTY")
    ds.StudyInstanceUID = ""
    status, comment = sc.raw_store(c.router.port, gen.CT_IMAGE, ds.SOPInstanceUID,
                                   sc.encode_dataset(ds))
    assert status == 0xC000, (hex(status), comment)
    _nothing_stored(c, tmp_path, "BAD-NOSOP", counts)
    _nothing_stored(c, tmp_path, "BAD-EMPTY", counts)
    echo(c.router)


def test_duplicate_identical_store_is_idempotent(main, ref, tmp_path):
    c = main["c"]
    counts = _counts(c)
    batches = ref.batches(ref.uids(PatientID="SPT0002"))  # ele, ile, rle, jll, jpb
    responses = store(c.routers[1], batches)
    assert_all_success(responses, ref.uids(PatientID="SPT0002"))
    assert _counts(c) == counts
    assert [n.stats(c.admin_key)["conflicts"] for n in c.nodes] == [0, 0, 0]
    status, rsps = find(c.router, "STUDY", {"PatientID": "SPT0002", S: "",
                                            "NumberOfStudyRelatedInstances": ""},
                        tmp_path / "f", "-S")
    assert [r["NumberOfStudyRelatedInstances"] for r in rsps] == ["7"]


def test_healthy_nodes_are_never_marked_down(main):
    """All nodes stayed up and answered every request of this module, so no
    router may have logged one as not answering (and skipped it in queries).
    A quorum write returns after W acknowledgements; the replica still
    working on its copy has not failed."""
    for r in main["c"].routers:
        bad = [line for line in r.log_text().splitlines() if "did not answer" in line]
        assert not bad, "\n".join(bad[:5])


def test_routers_survived_everything(main):
    c = main["c"]
    for r in c.routers:
        assert r.alive(), r.log_text()[-3000:]
        echo(r)
    for n in c.nodes:
        assert n.alive()


# ---- destructive tests: each on its own small cluster -----------------------------------

@pytest.fixture
def small(tmp_path):
    """A fresh 3-node cluster (N=3, W=2) with short timeouts, two routers and
    a C-MOVE destination."""
    dest = sc.Scp(tmp_path / "dest", "DEST")
    c = sc.cluster(tmp_path / "cluster", nodes=3, replicas=3, quorum=2, routers=2,
                   dests={"DEST": dest.port}, cluster_opts=FAST)
    yield c, dest
    c.stop()
    dest.stop()


def _study_batches(ref, pids):
    uids = [u for pid in pids for u in ref.uids(PatientID=pid)]
    return uids, ref.batches(uids)


def _move_all(c, router, dest, ref, uids):
    dest.clear()
    studies = sorted({ref.ds.record(u)[S] for u in uids})
    status, out = move(router, "DEST", "STUDY", {S: "\\".join(studies)}, check=False)
    received = {u: p for u, p in dest.files().items() if u in set(uids)}
    return status, out, received


def test_one_node_killed_stores_succeed_and_all_is_retrievable(small, ref, tmp_path):
    c, dest = small
    before, b1 = _study_batches(ref, ["SPT0001", "SPT0002"])   # 13 + 7 instances
    assert len(before) == 20
    assert_all_success(store(c.router, b1), before)
    c.node("n1").kill9()
    after, b2 = _study_batches(ref, ["SPT0003", "SPT0005"])    # 9 + 8
    assert len(after) == 17
    t0 = time.monotonic()
    assert_all_success(store(c.router, b2), after)
    assert time.monotonic() - t0 < 5, "stores waited on the dead node"
    assert [node_instances(c, n) for n in c.nodes[1:]] == [37, 37]
    # everything, stored before and after the kill, comes back byte for byte
    status, out, received = _move_all(c, c.router, dest, ref, before + after)
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, before + after) == 37
    status, rsps = find(c.routers[1], "IMAGE", {"SOPInstanceUID": ""}, tmp_path / "f")
    assert status == "Success"
    assert sorted(r["SOPInstanceUID"] for r in rsps) == sorted(before + after)
    study = _study("SPT0005", 3)
    status, files, out = get(c.routers[1], tmp_path / "g", "STUDY", {S: study})
    assert status == 0x0000, out[-3000:]
    check_received(ref, files, ref.uids(StudyInstanceUID=study), converted_ok=True)
    # Both routers know the node is dead by now, from a request it did not
    # answer or from gossip (down): further retrieves must not wait for it
    # again (each wait is a whole query/fetch timeout, 8 s here, 10 s / 30 s
    # by default).
    def knows_dead(r):
        text = r.log_text()
        return ("node n1 " in text and "did not answer" in text) or \
            r.member_states().get("n1") == "down"
    sc.wait_until(lambda: all(knows_dead(r) for r in c.routers), 20,
                  "both routers knowing n1 is dead", c.views)
    t0 = time.monotonic()
    status, out, received = _move_all(c, c.router, dest, ref, before + after)
    took = time.monotonic() - t0
    assert status == 0x0000 and check_received(ref, received, before + after) == 37
    assert took < 4, f"C-MOVE of 37 instances took {took:.1f} s: it waited on the dead node"
    t0 = time.monotonic()
    status, files, out = get(c.routers[1], tmp_path / "g2", "STUDY", {S: study})
    took = time.monotonic() - t0
    assert status == 0x0000 and len(files) == 2
    assert took < 4, f"C-GET of 2 instances took {took:.1f} s: it waited on the dead node"
    for r in c.routers:
        assert r.alive()
        echo(r)


def test_two_nodes_killed_stores_fail_and_nothing_is_half_acknowledged(small, ref, tmp_path):
    c, dest = small
    before, b1 = _study_batches(ref, ["SPT0004"])              # 5 instances
    assert_all_success(store(c.router, b1), before)
    c.node("n2").kill9()
    c.node("n3").kill9()
    # SPT0006: 3 instances in ele, ile, rle (one storescu each)
    failing = ref.uids(PatientID="SPT0006")
    responses = store(c.router, ref.batches(failing), check=False)
    assert sorted(u for u, _ in responses) == sorted(failing), responses
    for uid, status in responses:
        assert is_failure(status), f"{uid} acknowledged with 0x{status:04X} on one node"
        assert status >> 8 in (0xA7, 0xC0), hex(status)  # "out of resources": retry later
    echo(c.router)
    # what was acknowledged before is still there, byte for byte
    status, out, received = _move_all(c, c.routers[1], dest, ref, before)
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, before) == 5
    # the nodes come back; the modality retries and now succeeds
    c.node("n2").restart()
    c.node("n3").restart()
    c.wait_alive()  # the routers learn from gossip that they are back
    assert_all_success(store(c.router, ref.batches(failing)), failing)
    status, out, received = _move_all(c, c.routers[1], dest, ref, before + failing)
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, before + failing) == 8
    deadline = time.monotonic() + 10
    while any(node_instances(c, n) != 8 for n in c.nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [node_instances(c, n) for n in c.nodes] == [8, 8, 8]
    assert c.router.alive() and c.routers[1].alive()


def test_killed_router_loses_nothing(small, ref, tmp_path):
    """storescu streams 16 instances to router1, which is killed -9 after a
    few acknowledgements; every instance it acknowledged is retrievable
    through router2, which then takes the rest."""
    c, dest = small
    r1, r2 = c.routers
    (option, paths), = [b for b in ref.batches() if b[0] == "-xe"]
    assert len(paths) == 16
    proc = subprocess.Popen(["storescu", "-d", option, "-aec", AE, "127.0.0.1", str(r1.port),
                             *map(str, paths)],
                            env=sc.DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, acked = [], 0
    timer = threading.Timer(60, proc.kill)
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if "DIMSE Status" in line and "0x0000" in line:
                acked += 1
                if acked == 6:
                    r1.kill9()
        proc.wait(timeout=30)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    responses = sc.store_responses("".join(lines))
    acknowledged = [u for u, s in responses if s == 0]
    assert 6 <= len(acknowledged) < len(paths), (len(acknowledged), len(paths))
    assert not r1.alive()
    status, out, received = _move_all(c, r2, dest, ref, acknowledged)
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, acknowledged) == len(acknowledged)
    # router2 takes over: the rest is stored and everything is found there
    done = set(acknowledged)
    rest = [p for p in paths
            if pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID not in done]
    all_uids = [pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert_all_success(store(r2, [(option, rest)]), sorted(set(all_uids) - done))
    status, rsps = find(r2, "IMAGE", {"SOPInstanceUID": ""}, tmp_path / "f")
    assert sorted(r["SOPInstanceUID"] for r in rsps) == sorted(all_uids)
    status, out, received = _move_all(c, r2, dest, ref, all_uids)
    assert check_received(ref, received, all_uids) == 16
    echo(r2)


def test_conflicting_duplicate_is_refused_and_original_kept(small, ref, tmp_path):
    c, dest = small
    uids, batches = _study_batches(ref, ["SPT0007"])           # 3 instances
    assert len(uids) == 3
    assert_all_success(store(c.router, batches), uids)
    # identical bytes again, through the other router: idempotent
    assert_all_success(store(c.routers[1], batches), uids)
    # the same SOP Instance UID with other content
    rec = ref.ds.record(next(u for u in uids if ref.ts[u] == gen.EXPLICIT_LE))
    ds = pydicom.dcmread(rec["path"])
    ds.SeriesDescription = "Changed behind the archive's back"
    changed = tmp_path / "changed.dcm"
    ds.save_as(str(changed), write_like_original=False)
    for r in c.routers:
        p = sc.dcmtk(["storescu", "-d", "-xe", "-aec", AE, "127.0.0.1", r.port, changed],
                     check=False)
        (got_uid, status), = sc.store_responses(p.out)
        assert got_uid == rec["SOPInstanceUID"]
        assert status == 0x0111, (hex(status), p.out[-2000:])
    # the original stays, byte for byte, and queries still show it
    status, out, received = _move_all(c, c.routers[1], dest, ref, uids)
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, uids) == 3
    status, rsps = find(c.router, "SERIES", {"SeriesInstanceUID": rec["SeriesInstanceUID"],
                                             "SeriesDescription": ""}, tmp_path / "f")
    assert [r["SeriesDescription"] for r in rsps] == [rec["SeriesDescription"]]
    # the conflict was recorded, not silently dropped or overwritten
    assert sum(n.stats(c.admin_key)["conflicts"] for n in c.nodes) >= 2
    assert [node_instances(c, n) for n in c.nodes] == [3, 3, 3]
    echo(c.router)


def test_node_back_from_the_dead_does_not_make_find_stale(tmp_path, ref):
    """n1 misses the second series of a study while it is down, then comes
    back. Study-level answers merged from the replicas must still count
    every instance the cluster acknowledged (not the stale copy's view)."""
    dest = sc.Scp(tmp_path / "dest", "DEST")
    c = sc.cluster(tmp_path / "cluster", nodes=3, replicas=3, quorum=2, routers=1,
                   dests={"DEST": dest.port},
                   cluster_opts=dict(FAST, retry_down="1s"))
    try:
        study = _study("SPT0001", 2)                          # MR x3, MR x3, SR x1
        recs = [r for r in ref.ds.instances() if r[S] == study]
        first = [r["SOPInstanceUID"] for r in recs if r["SeriesNumber"] == "1"]
        rest = [r["SOPInstanceUID"] for r in recs if r["SeriesNumber"] != "1"]
        assert (len(first), len(rest)) == (3, 4)
        assert_all_success(store(c.router, ref.batches(first)), first)
        c.node("n1").kill9()
        assert_all_success(store(c.router, ref.batches(rest)), rest)
        # The router's sockets keep the puts for n1 queued and would deliver
        # them when it is back; a router restart drops them, so n1 really
        # stays behind (as after a longer outage).
        c.router.kill9()
        c.node("n1").restart()
        c.router.start()
        # The router sees n1 back (joining while its first repair round
        # runs, where nodes have one; then alive). n1 holds 3 instances
        # unless its repair already caught up with the other 4.
        c.wait_member("n1", ("joining", "alive"), observers=[c.router])
        assert 3 <= node_instances(c, c.node("n1")) <= 7
        assert [node_instances(c, n) for n in c.nodes[1:]] == [7, 7]
        keys = {S: "", "PatientID": "SPT0001", "ModalitiesInStudy": "",
                "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}
        want = expected(ref, "STUDY", dict(keys, StudyDate="20231102"))
        for attempt in range(2):
            for k in (S, None):  # scattered, and sent to the study's replicas
                q = dict(keys, **({S: study} if k else {}), StudyDate="20231102")
                status, rsps = find(c.router, "STUDY", q, tmp_path / f"f{attempt}{k}")
                assert status == "Success"
                got = got_records("STUDY", q, rsps)
                assert got == want, (got, want)
        status, out, received = _move_all(c, c.router, dest, ref, first + rest)
        assert status == 0x0000, out[-3000:]
        assert check_received(ref, received, first + rest) == 7
    finally:
        c.stop()
        dest.stop()


def test_concurrent_associations_through_both_routers(small, ref, tmp_path):
    """Eight storescu at once, split over the two routers, then everything
    found and retrieved byte for byte."""
    c, dest = small
    jobs = []
    for i, (option, paths) in enumerate(ref.batches()):
        half = len(paths) // 2 or 1
        for j, part in enumerate((paths[:half], paths[half:])):
            if not part:
                continue
            r = c.routers[(i + j) % 2]
            jobs.append(subprocess.Popen(
                ["storescu", "-d", option, "-aec", AE, "127.0.0.1", str(r.port),
                 *map(str, part)], env=sc.DCMTK_ENV, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT))
    assert len(jobs) >= 8
    responses = []
    for j in jobs:
        out, _ = j.communicate(timeout=120)
        assert j.returncode == 0, out.decode(errors="replace")[-3000:]
        responses += sc.store_responses(out.decode("utf-8", "replace"))
    assert_all_success(responses, ref.uids())
    status, rsps = find(c.routers[1], "IMAGE", {"SOPInstanceUID": ""}, tmp_path / "f")
    assert len(rsps) == 48
    status, out, received = _move_all(c, c.router, dest, ref, ref.uids())
    assert status == 0x0000, out[-3000:]
    assert check_received(ref, received, ref.uids()) == 48


def test_calling_ae_allow_list(small):
    """With [dicom] allowed_callers set, only those calling AE titles get an
    association; others are rejected (calling AE title not recognised)."""
    c, _ = small
    # Its key is not in the cluster keys: it serves DICOM at once without
    # waiting for gossip, which is all this test needs.
    r = sc.Router(c.root, "guarded", c.keys, c.nodes,
                  extra="[dicom]\nallowed_callers = MODALITY1, VIEWER2\n"
                        "[cluster]\njoin_timeout = 0s\n")
    r.start()
    try:
        for ae in ("MODALITY1", "VIEWER2"):
            p = sc.dcmtk(["echoscu", "-v", "-aet", ae, "-aec", AE, "127.0.0.1", r.port],
                         timeout=20)
            assert "Received Echo Response (Success)" in p.out
        p = sc.dcmtk(["echoscu", "-v", "-aet", "INTRUDER", "-aec", AE, "127.0.0.1", r.port],
                     timeout=20, check=False)
        assert p.returncode != 0 and "Echo Response" not in p.out
        assert "Calling AE Title Not Recognized" in p.out, p.out[-2000:]
        assert "INTRUDER" in r.log_text() and "allowed_callers" in r.log_text()
        echo(c.router)  # routers without the setting admit anyone
    finally:
        r.stop()


def test_patient_counts_are_cluster_wide(ref, tmp_path):
    """With more nodes than replicas a patient's studies land on different
    replica sets; NumberOfPatientRelated* must still count all of them."""
    with sc.cluster(tmp_path / "wide", nodes=5, replicas=1, quorum=1) as c:
        assert_all_success(store(c.router, ref.batches()), list(ref.files))
        held = [node_instances(c, n) for n in c.nodes]
        assert all(h < len(ref.files) for h in held), held  # the set is really spread
        keys = {"PatientID": "", "NumberOfPatientRelatedStudies": "",
                "NumberOfPatientRelatedSeries": "", "NumberOfPatientRelatedInstances": ""}
        status, rsps = find(c.router, "PATIENT", keys, tmp_path / "f", model="-P")
        assert status == "Success"
        want = ref.ds.expected_find("PATIENT", keys)
        count_keys = [k for k in keys if k.startswith("Number")]
        got = {r["PatientID"]: [int(r[k]) for k in count_keys] for r in rsps}
        assert got == {w["PatientID"]: [int(w[k]) for k in count_keys] for w in want}
        assert any(v[0] > 1 for v in got.values())  # some patient has several studies


# ---- placement from gossip: new members, stand-ins ----------------------------------------

def _fresh_studies(tmp_path, count, pid):
    """count one-instance studies with fresh UIDs, saved as explicit VR
    files; returns [(study UID, SOP Instance UID, path)]."""
    out = []
    for i in range(count):
        ds = _image(pid=pid, name=f"Gossip^{pid}{i}")
        path = _save(ds, tmp_path / f"{pid}-{i}.dcm")
        out.append((ds.StudyInstanceUID, ds.SOPInstanceUID, path))
    return out


def _holders(c, study, skip=()):
    """Names of the running nodes (but those in skip) holding any instance of
    a study."""
    return sorted(n.name for n in c.nodes
                  if n.alive() and n.name not in skip and n.list_study(c.admin_key, study))


def _keys_reloaded(c, timeout=5.0):
    """True once every running node and router logged a reload of the
    cluster key file (processes follow the file while they run)."""
    def reloaded(p):
        return re.search(r"cluster keys \S+ reloaded", p.log_text(this_run=True))
    procs = [p for p in c.nodes[:-1] + c.routers if p.alive()]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(reloaded(p) for p in procs):
            return True
        time.sleep(0.1)
    return False


def test_router_learns_a_new_node_from_gossip(tmp_path):
    """A fourth node is added to a running cluster (key appended to the key
    file, started with seeds): the router learns it from gossip, without any
    configuration change, and places new studies on it. With W = N = 3 a
    Success means every owner stored the instance, so right after the
    stores the studies the router placed on n4 are on n4."""
    with sc.cluster(tmp_path / "grow", nodes=3, replicas=3, quorum=3,
                    cluster_opts=FAST) as c:
        n4 = c.add_node()
        if not _keys_reloaded(c):
            pytest.skip("running members do not re-read cluster.keys yet, so a node "
                        "added to a running cluster is refused (common/keys.c reload)")
        c.wait_alive(timeout=60)
        log = c.router.log_text()
        assert re.search(r"member n4 new -> (joining|alive)", log), log[-3000:]
        assert c.router.member_states()["n4"] == "alive"
        studies = _fresh_studies(tmp_path, 8, "GROW")
        assert_all_success(store(c.router, [("-xe", [p for _, _, p in studies])]),
                           [u for _, u, _ in studies])
        on_n4 = [s for s, u, _ in studies if u in n4.list_study(c.admin_key, s)]
        # each study has 3 owners among 4 nodes: (1/4)^8 that n4 owns none
        assert on_n4, "no new study was placed on the new node"
        for study, uid, _ in studies:
            holders = _holders(c, study)
            assert len(holders) == 3, (study, holders)
        # what n4 holds is readable through the router
        status, files, out = get(c.router, tmp_path / "g", "STUDY", {S: on_n4[0]})
        assert status == 0x0000 and len(files) == 1, out[-3000:]
        echo(c.router)


@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_store_with_an_owner_down_goes_to_a_stand_in(tmp_path, how):
    """4 nodes, N = 3, W = 3: with n2 dead (kill -9) or paused (SIGSTOP) and
    known down by the router's gossip, only 3 nodes are reachable, so every
    study n2 owns can only reach W through a stand-in. Every store answers
    Success, the stand-in really holds the instance (checked on it with the
    CLI) and everything is readable through the router (C-GET)."""
    c = sc.cluster(tmp_path / "sloppy", nodes=4, replicas=3, quorum=3, cluster_opts=FAST,
                   router_extra={"log": {"level": "debug"}})
    victim = c.node("n2")
    try:
        if how == "kill9":
            victim.kill9()
        else:
            victim.pause()
        c.wait_member("n2", "down", observers=[c.router], timeout=30)
        studies = _fresh_studies(tmp_path, 8, "SLOPPY")
        assert_all_success(store(c.router, [("-xe", [p for _, _, p in studies])]),
                           [u for _, u, _ in studies])
        stood = re.findall(r"study (\S+) partition \d+: (\S+) stands in for n2",
                           c.router.log_text())
        by_study = dict(stood)
        mine = [s for s, _, _ in studies if s in by_study]
        # n2 owns a study with probability 3/4: (1/4)^8 that it owns none
        assert mine, "no store needed a stand-in"
        for study, uid, path in studies:
            if study in by_study:
                stand_in = c.node(by_study[study])
                assert stand_in.name != "n2"
                held = stand_in.list_study(c.admin_key, study)
                assert uid in held, (study, stand_in.name, held)
            # W = 3 acknowledged copies, all on live nodes
            holders = _holders(c, study, skip=("n2",))
            assert len(holders) == 3, (study, holders)
        for i, (study, uid, path) in enumerate(studies):
            status, files, out = get(c.router, tmp_path / f"g{i}", "STUDY", {S: study})
            assert status == 0x0000 and list(files) == [uid], out[-3000:]
            got, want = pydicom.dcmread(str(files[uid])), pydicom.dcmread(str(path))
            assert got.PixelData == want.PixelData and got.PatientName == want.PatientName
        assert c.router.alive()
        echo(c.router)
    finally:
        if how == "sigstop" and victim.alive():
            victim.resume()
        c.stop()
