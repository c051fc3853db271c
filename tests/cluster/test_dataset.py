"""Tests of the test data generator tests/cluster/dataset.py: the files are
valid for pydicom and DCMTK, the set has the promised variety, expected_find
follows PS3.4 C.2.2.2 on hand-checked queries (and agrees with DCMTK's
dcmqrscp where that implements the same rule), the findscu output parsers
agree with each other, and the bulk generator writes what it says.

Run: /usr/bin/python3 -m pytest -q tests/cluster/test_dataset.py
"""
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
from spcluster import free_port  # noqa: E402
from dataset import (BASIC_TEXT_SR, CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, MR_IMAGE,  # noqa: E402
                     SC_IMAGE, make_bulk_set, make_test_set)

ENV = dict(os.environ, TCP_NODELAY="1")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_test_set(tmp_path_factory.mktemp("testset"))


def uids(records, key):
    return sorted(r[key] for r in records)


def study_of(ds, patient_id, n):
    """The StudyInstanceUID of the n-th (1-based) study of a patient."""
    return f"{gen.TEST_ROOT}.{ds.seed}.1.{int(patient_id[-1])}.{n}"


# ---- the files ---------------------------------------------------------------------

def test_files_readable_by_pydicom(ds):
    assert 40 <= len(ds) <= 80
    total = 0
    for r in ds.instances():
        path = Path(r["path"])
        total += path.stat().st_size
        f = pydicom.dcmread(str(path))
        assert f.file_meta.TransferSyntaxUID == r["TransferSyntaxUID"]
        assert f.file_meta.MediaStorageSOPInstanceUID == r["SOPInstanceUID"]
        assert gen.record_from_dataset(f) == {k: r[k] for k in gen.INDEXED}
        if r["SOPClassUID"] == BASIC_TEXT_SR:
            assert len(f.ContentSequence) == 2
            assert "PixelData" not in f
        elif not f.file_meta.TransferSyntaxUID.is_compressed:
            arr = f.pixel_array
            assert arr.shape[:2] == (f.Rows, f.Columns) and arr.std() > 0
    assert 1_000_000 < total < 8_000_000, total  # "a few MB"


def test_files_readable_by_dcmdump(ds):
    p = subprocess.run(["dcmdump", *map(str, ds.paths())], env=ENV,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert p.stdout.count(b"# Dicom-File-Format") == len(ds)
    assert b"E: " not in p.stderr and b"W: " not in p.stderr, p.stderr


def test_compressed_files_decode_with_dcmtk(ds, tmp_path):
    decoder = {gen.RLE_LOSSLESS: "dcmdrle", gen.JPEG_LOSSLESS_SV1: "dcmdjpeg",
               gen.JPEG_BASELINE: "dcmdjpeg", gen.JPEG_LS_LOSSLESS: "dcmdjpls"}
    for ts, paths in ds.by_transfer_syntax().items():
        if ts not in decoder:
            continue
        src = paths[0]
        out = tmp_path / f"{ts}.dcm"
        gen.run_tool([decoder[ts], src, out])
        f = pydicom.dcmread(str(out))
        assert f.file_meta.TransferSyntaxUID in (EXPLICIT_LE, "1.2.840.10008.1.2.1")
        assert f.SOPInstanceUID == pydicom.dcmread(str(src)).SOPInstanceUID
        assert f.pixel_array.shape[:2] == (f.Rows, f.Columns)


def test_character_sets_on_disk(ds):
    by_name = {r["PatientName"]: r for r in ds.instances()}
    latin = Path(by_name["Müller^Jürgen"]["path"]).read_bytes()
    assert "Müller^Jürgen".encode("latin-1") in latin
    assert "Müller".encode("utf-8") not in latin
    greek = Path(by_name["Παπαδοπούλου^Ελένη"]["path"]).read_bytes()
    assert "Παπαδοπούλου^Ελένη".encode("utf-8") in greek
    assert by_name["Ñúñez^José"]["SpecificCharacterSet"] == "ISO_IR 192"
    assert by_name["Иванова^Анна"]["SpecificCharacterSet"] == "ISO_IR 192"
    assert by_name["Doe^John"]["SpecificCharacterSet"] == ""
    assert "SpecificCharacterSet" not in pydicom.dcmread(by_name["Doe^John"]["path"])


def test_sequences_have_undefined_length(ds):
    srs = [r for r in ds.instances() if r["SOPClassUID"] == BASIC_TEXT_SR]
    assert {r["TransferSyntaxUID"] for r in srs} >= {EXPLICIT_LE, IMPLICIT_LE}
    for r in srs:
        f = pydicom.dcmread(r["path"])
        assert f["ContentSequence"].is_undefined_length
        assert all(item.is_undefined_length_sequence_item for item in f.ContentSequence)
        inner = f.ContentSequence[0]["ContentSequence"]
        assert inner.is_undefined_length and len(inner.value) == 2
        assert len(f.ReferencedPerformedProcedureStepSequence) == 0  # empty, undefined length
    explicit_sr = next(r for r in srs if r["TransferSyntaxUID"] == EXPLICIT_LE)
    raw = gen.dataset_bytes_after_meta(explicit_sr["path"])
    assert struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0\xff\xff\xff\xff" in raw
    # the DCMTK tools were told to keep undefined lengths too
    rle = next(r for r in ds.instances() if r["TransferSyntaxUID"] == gen.RLE_LOSSLESS)
    assert pydicom.dcmread(rle["path"])["ProcedureCodeSequence"].is_undefined_length


def test_variety(ds):
    pats = ds.patients()
    assert len(pats) >= 4
    charsets = ds.character_sets()
    assert {"ISO_IR 100", "ISO_IR 192", ""} <= charsets
    non_ascii = {p["SpecificCharacterSet"] for p in pats if not p["PatientName"].isascii()}
    assert {"ISO_IR 100", "ISO_IR 192"} <= non_ascii
    names = {p["PatientName"] for p in pats}
    assert {"Müller^Jürgen", "Ñúñez^José"} <= names
    assert any(any("\u0370" <= c <= "\u04ff" for c in n) for n in names)  # Greek/Cyrillic
    classes = {r["SOPClassUID"] for r in ds.instances()}
    assert classes == {CT_IMAGE, MR_IMAGE, SC_IMAGE, BASIC_TEXT_SR}
    assert {r["Modality"] for r in ds.series()} == {"CT", "MR", "OT", "SR"}
    ts = ds.transfer_syntaxes()
    assert len(ts) >= 3 and {EXPLICIT_LE, IMPLICIT_LE} <= ts
    assert ts & gen.COMPRESSED == gen.COMPRESSED  # RLE, JPEG lossless, baseline, JPEG-LS
    assert {p["PatientSex"] for p in pats} == {"M", "F", "O"}
    studies = ds.studies()
    for key in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                "ReferringPhysicianName", "StudyDescription", "StudyInstanceUID"):
        assert len({s[key] for s in studies}) == len(studies), key
    for p in pats:
        assert 1 <= int(p["NumberOfPatientRelatedStudies"]) <= 3
    for s in studies:
        assert 1 <= int(s["NumberOfStudyRelatedSeries"]) <= 3
    for r in ds.instances():
        assert r["SOPInstanceUID"].startswith(gen.TEST_ROOT + ".0.")
        assert len(r["SOPInstanceUID"]) <= 64


def test_level_records_counts(ds):
    pats = {p["PatientID"]: p for p in ds.patients()}
    assert sum(int(p["NumberOfPatientRelatedInstances"]) for p in pats.values()) == len(ds)
    assert sum(int(p["NumberOfPatientRelatedSeries"]) for p in pats.values()) == \
        len(ds.series())
    assert pats["SPT0001"]["NumberOfPatientRelatedStudies"] == "2"
    assert pats["SPT0001"]["NumberOfPatientRelatedSeries"] == "5"
    assert pats["SPT0001"]["NumberOfPatientRelatedInstances"] == "13"
    studies = {s["StudyInstanceUID"]: s for s in ds.studies()}
    s = studies[study_of(ds, "SPT0001", 2)]
    assert s["ModalitiesInStudy"] == "MR\\SR"
    assert s["NumberOfStudyRelatedSeries"] == "3" and s["NumberOfStudyRelatedInstances"] == "7"
    assert s["PatientName"] == "Müller^Jürgen" and s["StudyTime"] == "141500.250"
    s = studies[study_of(ds, "SPT0005", 3)]
    assert s["ModalitiesInStudy"] == "OT\\SR"
    assert s["SOPClassesInStudy"] == "\\".join(sorted([SC_IMAGE, BASIC_TEXT_SR]))
    ser = [x for x in ds.series() if x["SeriesDescription"] == "Axial 5mm Hirn"]
    assert len(ser) == 1 and ser[0]["NumberOfSeriesRelatedInstances"] == "4"


def test_deterministic(ds, tmp_path):
    again = make_test_set(tmp_path / "again")
    assert [Path(p).name for p in again.paths()] == [Path(p).name for p in ds.paths()]
    for a, b in zip(again.paths(), ds.paths()):
        assert a.read_bytes() == b.read_bytes(), a.name
    other = make_test_set(tmp_path / "seed1", seed=1)
    assert not set(uids(other.instances(), "SOPInstanceUID")) & \
        set(uids(ds.instances(), "SOPInstanceUID"))
    back = gen.DataSet.from_json(_dump(ds, tmp_path / "m.json"))
    assert back.instances() == ds.instances()


def _dump(ds, path):
    ds.to_json(path)
    return path


# ---- expected_find -----------------------------------------------------------------

def test_find_names_wildcards_and_case(ds):
    f = ds.expected_find
    john = [study_of(ds, "SPT0005", n) for n in (1, 2, 3)]
    jane = [study_of(ds, "SPT0006", 1)]
    assert uids(f("STUDY", {"PatientName": "Doe*", "StudyInstanceUID": ""}),
                "StudyInstanceUID") == john
    assert uids(f("STUDY", {"PatientName": "doe*"}, pn_case_insensitive=True),
                "StudyInstanceUID") == sorted(john + jane)
    assert f("STUDY", {"PatientName": "DOE^JOHN"}) == []
    assert len(f("STUDY", {"PatientName": "DOE^JOHN"}, pn_case_insensitive=True)) == 3
    # case-insensitivity applies to PN only
    assert f("STUDY", {"StudyDescription": "ct head*"}, pn_case_insensitive=True) == []
    # ? is one character, not one byte (ü is two bytes in UTF-8)
    assert [p["PatientID"] for p in f("PATIENT", {"PatientName": "M?ller^J?rgen"})] == \
        ["SPT0001"]
    assert f("PATIENT", {"PatientName": "M??ller*"}) == []
    assert [p["PatientID"] for p in f("PATIENT", {"PatientName": "Ñ*"})] == ["SPT0002"]
    assert [p["PatientID"] for p in f("PATIENT", {"PatientName": "*^Анна"})] == ["SPT0004"]
    assert [p["PatientID"] for p in f("PATIENT", {"PatientName": "παπα*"},
                                      pn_case_insensitive=True)] == ["SPT0003"]
    assert len(f("PATIENT", {"PatientName": "*"})) == 7
    assert len(f("PATIENT", {"PatientID": "SPT000?"})) == 7
    assert f("PATIENT", {"PatientID": "SPT000"}) == []
    # the referring physician Doe^John is not the patient
    assert uids(f("STUDY", {"ReferringPhysicianName": "Doe^John"}), "StudyInstanceUID") == jane


def test_find_dates_and_times(ds):
    f = ds.expected_find

    def dates(keys):
        return sorted(r["StudyDate"] for r in f("STUDY", keys))
    assert dates({"StudyDate": "20210101-20221231"}) == ["20210315", "20210316", "20220101",
                                                         "20220630"]
    assert dates({"StudyDate": "-20000101"}) == ["19991231"]
    assert dates({"StudyDate": "20240101-"}) == ["20240229"]
    assert dates({"StudyDate": "20230704"}) == ["20230704"]
    assert dates({"StudyDate": "20210315-20210315"}) == ["20210315"]
    assert dates({"StudyDate": "20230101-20231231", "PatientSex": "F"}) == ["20230704"]
    assert dates({"PatientBirthDate": "-19601231"}) == ["19991231", "20210315", "20210316",
                                                        "20220101", "20231102"]

    def times(keys):
        return sorted(r["StudyTime"] for r in f("STUDY", keys))
    assert times({"StudyTime": "0800-0930"}) == ["083012", "0930", "093000"]
    assert times({"StudyTime": "14-16"}) == ["141500.250", "160512.5"]  # whole hours
    assert times({"StudyTime": "2300-"}) == ["235959"]
    assert times({"StudyTime": "-000000"}) == ["000000"]
    assert times({"StudyTime": "093000"}) == ["0930", "093000"]  # 0930 == 093000
    assert times({"StudyTime": "141500.25-141500.25"}) == ["141500.250"]


def test_find_uids_numbers_and_levels(ds):
    f = ds.expected_find
    a, b = study_of(ds, "SPT0001", 1), study_of(ds, "SPT0005", 2)
    got = f("STUDY", {"StudyInstanceUID": f"{a}\\{b}", "PatientName": ""})
    assert uids(got, "StudyInstanceUID") == sorted([a, b])
    assert f("STUDY", {"StudyInstanceUID": a[:-1] + "9"}) == []
    assert f("STUDY", {"StudyInstanceUID": a[:-2]}) == []         # no prefix matching
    series = f("SERIES", {"StudyInstanceUID": a})
    assert [s["SeriesNumber"] for s in sorted(series, key=lambda s: int(s["SeriesNumber"]))] \
        == ["1", "2"]
    assert len(f("SERIES", {"Modality": "SR"})) == 3
    assert len(f("SERIES", {"SeriesNumber": "99"})) == 1
    assert len(f("SERIES", {"SeriesNumber": "099"})) == 1         # IS compares as a number
    assert len(f("IMAGE", {"SOPClassUID": SC_IMAGE})) == 4
    assert len(f("IMAGE", {"SOPClassUID": f"{SC_IMAGE}\\{BASIC_TEXT_SR}"})) == 7
    assert len(f("INSTANCE", {"StudyInstanceUID": a})) == 6
    # ModalitiesInStudy: any key value against any value of the study
    assert len(f("STUDY", {"ModalitiesInStudy": "SR"})) == 3
    assert len(f("STUDY", {"ModalitiesInStudy": "OT\\SR"})) == 5
    assert len(f("STUDY", {"ModalitiesInStudy": "CT"})) == 6
    # universal matching, "*", empty values
    assert len(f("SERIES", {"SeriesDescription": ""})) == 22
    assert len(f("SERIES", {"SeriesDescription": "*"})) == 22
    assert len(f("SERIES", {"SeriesDescription": "?*"})) == 21  # one series has none
    # query-only attributes are no matching keys
    assert len(f("PATIENT", {"QueryRetrieveLevel": "PATIENT",
                             "SpecificCharacterSet": "ISO_IR 192"})) == 7
    with pytest.raises(ValueError):
        f("SERIES", {"NumberOfStudyRelatedInstances": "3"})


def test_find_projection(ds):
    got = ds.expected_find("STUDY", {"SpecificCharacterSet": "ISO_IR 192",
                                     "PatientID": "SPT0003", "StudyDate": "2024*",
                                     "StudyDescription": "", "AdmittingDiagnosesDescription": "",
                                     "NumberOfStudyRelatedInstances": ""}, project=True)
    # 2024* is no wildcard for DA: single value matching, nothing matches
    assert got == []
    got = ds.expected_find("STUDY", {"PatientID": "SPT0003", "StudyDate": "2024-",
                                     "StudyDescription": "", "AdmittingDiagnosesDescription": "",
                                     "NumberOfStudyRelatedInstances": ""}, project=True)
    assert got == [{"PatientID": "SPT0003", "StudyDate": "20240229",
                    "StudyDescription": "Αξονική κοιλίας", "AdmittingDiagnosesDescription": "",
                    "NumberOfStudyRelatedInstances": "3"}]


def test_match_value_unit():
    m = gen.match_value
    assert m("PatientName", "", "") and m("PatientName", "*", "")
    assert not m("PatientName", "A*", "")
    assert m("StudyDescription", "a*c", "abc") and not m("StudyDescription", "a*c", "abcd")
    assert m("StudyDescription", "a.c", "a.c") and not m("StudyDescription", "a.c", "abc")
    assert m("StudyDescription", "(x)+", "(x)+")      # regex characters are literal
    assert m("StudyDate", "20200101-20200101", "20200101")
    assert not m("StudyDate", "20200102-", "20200101")
    assert m("StudyTime", "10-10", "105959.999999") and not m("StudyTime", "10-10", "110000")
    assert m("StudyTime", "1015", "101500") and not m("StudyTime", "1015", "101501")
    assert m("ModalitiesInStudy", "MR", "CT\\MR") and not m("ModalitiesInStudy", "US", "CT\\MR")


# ---- findscu output and a reference SCP (DCMTK's dcmqrscp) -------------------------------

@pytest.fixture(scope="module")
def qrscp(ds, tmp_path_factory):
    """dcmqrscp (fork mode: in single-process mode 3.6.7 crashes after the
    first association) serving the test set as AE TESTQR."""
    base = tmp_path_factory.mktemp("qr")
    db = base / "db"
    db.mkdir()
    port = free_port()
    cfg = base / "qr.cfg"
    cfg.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                   "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                   f"AETable BEGIN\nTESTQR {db} R (200, 1024mb) ANY\nAETable END\n")
    gen.run_tool(["dcmqridx", db, *ds.paths()])
    log = open(base / "qr.log", "wb")
    proc = subprocess.Popen(["dcmqrscp", "-c", str(cfg), str(port)], env=ENV,
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (base / "qr.log").read_text()
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _findscu_log(port, level, keys):
    args = ["findscu", "-S", "-aec", "TESTQR", "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    p = subprocess.run(args + ["127.0.0.1", str(port)], env=ENV, capture_output=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_findscu_parsers_agree_with_expected(ds, qrscp, tmp_path):
    keys = {"PatientID": "SPT0001", "PatientName": "", "StudyDescription": "",
            "StudyInstanceUID": "", "StudyDate": "", "ReferringPhysicianName": ""}
    from_log = gen.parse_findscu_output(_findscu_log(qrscp, "STUDY", keys))
    from_files = gen.run_findscu("127.0.0.1", qrscp, "STUDY", keys, tmp_path / "x",
                                 aec="TESTQR")
    assert len(from_log) == 2
    assert from_log == from_files
    assert from_log[0]["SpecificCharacterSet"] == "ISO_IR 100"
    got = sorted(({k: r[k] for k in keys} for r in from_log),
                 key=lambda r: r["StudyInstanceUID"])
    assert got == ds.expected_find("STUDY", keys, project=True)
    assert got[0]["ReferringPhysicianName"] == "Weiß^Kläre"


@pytest.mark.parametrize("keys", [
    {"StudyDate": "20210101-20221231"},
    {"StudyDate": "-20000101"},
    {"StudyTime": "0800-0930"},
    {"PatientName": "Doe*"},
    {"PatientID": "SPT000*", "StudyDate": "20180101-20201231"},
])
def test_expected_find_agrees_with_dcmqrscp(ds, qrscp, keys):
    keys = dict(keys, StudyInstanceUID="")
    got = gen.parse_findscu_output(_findscu_log(qrscp, "STUDY", keys))
    assert uids(got, "StudyInstanceUID") == \
        uids(ds.expected_find("STUDY", keys), "StudyInstanceUID")


def test_expected_find_uid_list_agrees_with_dcmqrscp(ds, qrscp):
    keys = {"StudyInstanceUID": f"{study_of(ds, 'SPT0001', 1)}\\{study_of(ds, 'SPT0005', 2)}",
            "PatientName": ""}
    got = gen.parse_findscu_output(_findscu_log(qrscp, "STUDY", keys))
    assert uids(got, "StudyInstanceUID") == \
        uids(ds.expected_find("STUDY", keys), "StudyInstanceUID")
    assert len(got) == 2


def test_parse_findscu_output_layouts():
    latin = "Müller^Jürgen".encode("latin-1")
    info = (b"I: Requesting Association\nI: Request Identifiers:\nI: \nI: # Dicom-Data-Set\n"
            b"I: (0010,0010) PN [Nobody]                                #   6, 1 PatientName\n"
            b"I: \nI: ---------------------------\nI: Find Response: 1 (Pending)\nI: \n"
            b"I: # Dicom-Data-Set\nI: # Used TransferSyntax: Little Endian Explicit\n"
            b"I: (0008,0005) CS [ISO_IR 100]                             #  10, 1 "
            b"SpecificCharacterSet\n"
            b"I: (0008,0016) UI =CTImageStorage                        #  26, 1 SOPClassUID\n"
            b"I: (0008,0061) CS [CT\\MR ]                                #   6, 2 "
            b"ModalitiesInStudy\n"
            b"I: (0008,1110) SQ (Sequence with undefined length #=1)     # u/l, 1 "
            b"ReferencedStudySequence\n"
            b"I:   (fffe,e000) na (Item with undefined length #=1)         # u/l, 1 Item\n"
            b"I:     (0008,1150) UI [1.2.3]                                  #   6, 1 "
            b"ReferencedSOPClassUID\n"
            b"I:   (fffe,e00d) na (ItemDelimitationItem)                   #   0, 0 "
            b"ItemDelimitationItem\n"
            b"I: (fffe,e0dd) na (SequenceDelimitationItem)               #   0, 0 "
            b"SequenceDelimitationItem\n"
            b"I: (0010,0010) PN [" + latin + b" ]                         #  14, 1 PatientName\n"
            b"I: (0010,1010) AS (no value available)                     #   0, 0 PatientAge\n"
            b"I: (0028,0010) US 64                                       #   2, 1 Rows\n"
            b"I: (0009,0010) LO [X]                                      #   2, 1 "
            b"Unknown Tag & Data\n"
            b"I: \nI: Received Final Find Response (Success)\nI: Releasing Association\n")
    want = {"SpecificCharacterSet": "ISO_IR 100", "SOPClassUID": CT_IMAGE,
            "ModalitiesInStudy": "CT\\MR", "ReferencedStudySequence": "<sequence>",
            "PatientName": "Müller^Jürgen", "PatientAge": "", "Rows": "64",
            "(0009,0010)": "X"}
    assert gen.parse_findscu_output(info) == [want]
    # the -d layout
    debug = info.replace(b"I: Find Response: 1 (Pending)\n",
                         b"I: Received Find Response 1\nD: ====== INCOMING DIMSE MESSAGE ===\n"
                         b"D: DIMSE Status : 0xff00: Pending\nD: ====== END ======\n"
                         b"D: Response Identifiers:\n").replace(b"\nI: (", b"\nD: (")
    assert gen.parse_findscu_output(debug) == [want]
    # text already decoded as UTF-8 (a UTF-8 response)
    utf8 = info.replace(b"ISO_IR 100]", b"ISO_IR 192]").replace(
        latin + b" ", "Ñúñez^José".encode("utf-8"))
    assert gen.parse_findscu_output(utf8.decode("utf-8"))[0]["PatientName"] == "Ñúñez^José"
    assert gen.parse_findscu_output(b"I: Received Final Find Response (Success)\n") == []


def test_dataset_bytes_after_meta(ds, tmp_path):
    for r in ds.instances()[:6]:
        raw = Path(r["path"]).read_bytes()
        group_length = struct.unpack_from("<I", raw, 140)[0]
        body = gen.dataset_bytes_after_meta(r["path"])
        assert body == raw[144 + group_length:]
        assert body[:2] == b"\x08\x00"                   # group 0008 comes first
        # without (0002,0000) the group is walked instead
        stripped = tmp_path / "nogl.dcm"
        stripped.write_bytes(raw[:132] + raw[144:])
        assert gen.dataset_bytes_after_meta(stripped) == body
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(ValueError):
        gen.dataset_bytes_after_meta(bad)


# ---- the bulk set ---------------------------------------------------------------------

def test_bulk_set(tmp_path):
    b = make_bulk_set(tmp_path / "bulk", small=20, ct=5, studies=3)
    assert len(b.small_paths) == 20 and len(b.ct_paths) == 5 and b.total_files == 25
    assert all(9_000 <= p.stat().st_size <= 12_000 for p in b.small_paths)
    assert all(524_288 < p.stat().st_size <= 535_000 for p in b.ct_paths)
    assert b.small_bytes == sum(p.stat().st_size for p in b.small_paths)
    assert b.total_bytes == b.small_bytes + b.ct_bytes
    seen, pixels = set(), set()
    for p in b.paths:
        f = pydicom.dcmread(str(p))
        assert f.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert f.SOPClassUID == CT_IMAGE and f.BitsAllocated == 16
        assert f.StudyInstanceUID in b.study_uids
        assert f.SOPInstanceUID.startswith(gen.BULK_ROOT + ".0.")
        seen.add(f.SOPInstanceUID)
        pixels.add(bytes(f.PixelData[:16]))
        assert len(f.PixelData) == f.Rows * f.Columns * 2 and f.Rows in (64, 512)
    assert len(seen) == 25 and len(pixels) == 25
    assert {pydicom.dcmread(str(p)).StudyInstanceUID for p in b.small_paths} == \
        set(b.study_uids)
    p = subprocess.run(["dcmdump", "-q", str(b.ct_paths[0]), str(b.small_paths[0])], env=ENV,
                       capture_output=True, timeout=30)
    assert p.returncode == 0 and not p.stderr
    again = make_bulk_set(tmp_path / "again", small=20, ct=5, studies=3)
    assert [x.read_bytes() for x in again.small_paths] == \
        [x.read_bytes() for x in b.small_paths]
    for path in (b.ct_paths[0], b.small_paths[-1]):
        assert pydicom.dcmread(str(path)).pixel_array.max() <= 4095   # BitsStored 12


def test_command_line(tmp_path):
    p = subprocess.run([sys.executable, str(Path(gen.__file__)), str(tmp_path),
                        "--small", "3", "--ct", "1", "--studies", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "test set: 48 files" in p.stdout and "bulk set: 3 small" in p.stdout
    assert len(list((tmp_path / "testset").glob("*.dcm"))) == 48
    assert len(list((tmp_path / "bulk" / "small").glob("*.dcm"))) == 3
    assert len(gen.DataSet.from_json(tmp_path / "testset.json")) == 48


def test_storescu_batches_keep_transfer_syntax(ds, tmp_path):
    """storescu with the option of DataSet.storescu_batches() sends every file
    in its stored transfer syntax (storescp +xa accepts them all)."""
    port = free_port()
    out = tmp_path / "rcv"
    out.mkdir()
    log = open(tmp_path / "scp.log", "wb")
    scp = subprocess.Popen(["storescp", "--bit-preserving", "+xa", "-od", str(out), str(port)],
                           env=ENV, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert scp.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        for option, paths in ds.storescu_batches():
            gen.run_tool(["storescu", option, "127.0.0.1", port, *paths], timeout=60)
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        log.close()
    got = {}
    for p in out.iterdir():
        f = pydicom.dcmread(str(p), stop_before_pixels=True)
        got[f.SOPInstanceUID] = f.file_meta.TransferSyntaxUID
    assert got == {r["SOPInstanceUID"]: r["TransferSyntaxUID"] for r in ds.instances()}
