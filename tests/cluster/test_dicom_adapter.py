"""Tests of the DICOM adapter (router/dicom_*.cc) through
tests/tools/dicom_harness, driven by DCMTK's own clients (echoscu, storescu,
findscu, movescu, getscu, storescp) and, for malformed requests no DCMTK tool
will send, by a minimal raw DICOM client.

Bit-exactness: storescu re-encodes what it sends, so the reference for every
"retrieved == stored" comparison is what a bit-preserving storescp received
from the same storescu invocation, compared after the meta header.

Run: /usr/bin/python3 -m pytest -q tests/cluster/test_dicom_adapter.py
(the harness comes from SP_BUILD_DIR, by default the repository's build/)
"""
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

import spcluster
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, RLELossless, generate_uid)

HARNESS = spcluster.BUILD / "dicom_harness"
ENV = dict(os.environ, TCP_NODELAY="1")
AE = "SHARDPACS"
TOOL_TIMEOUT = 30


def run(args, timeout=TOOL_TIMEOUT, check=True):
    p = subprocess.run([str(a) for a in args], env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def statuses(output):
    """DIMSE status codes printed by a DCMTK tool run with -d."""
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def dataset_bytes(path):
    """The bytes of a Part-10 file after its meta header."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM"
    off = 132
    while True:
        group, = struct.unpack_from("<H", raw, off)
        if group != 0x0002:
            return raw[off:]
        vr = raw[off + 4:off + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            length, = struct.unpack_from("<I", raw, off + 8)
            off += 12 + length
        else:
            length, = struct.unpack_from("<H", raw, off + 6)
            off += 8 + length


# ---- test data -------------------------------------------------------------

def make_image(sop_class, study, series, patient_id, name, modality, number, charset=None,
               with_sequence=False):
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + patient_id
    ds.StudyID = "1"
    ds.StudyDescription = "Test study " + patient_id
    ds.Modality = modality
    ds.SeriesNumber = str(number)
    ds.InstanceNumber = "1"
    if with_sequence:
        item = Dataset()
        item.CodeValue = "T-A0100"
        item.CodingSchemeDesignator = "SRT"
        item.CodeMeaning = "Brain"
        ds.AnatomicRegionSequence = Sequence([item])
    ds.Rows = 4
    ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    return ds


def save(ds, path, ts):
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = ts
    ds.file_meta = fm
    ds.is_little_endian = True
    ds.is_implicit_VR = ts == ImplicitVRLittleEndian
    ds.save_as(str(path), write_like_original=False)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    study1, study2, study3 = generate_uid(), generate_uid(), generate_uid()
    ct = make_image(CTImageStorage, study1, generate_uid(), "P1", "Doe^John", "CT", 1,
                    with_sequence=True)
    mr = make_image(MRImageStorage, study1, generate_uid(), "P1", "Doe^John", "MR", 2)
    latin = make_image(CTImageStorage, study2, generate_uid(), "P2", "Müller^Hans", "CT", 1,
                       charset="ISO_IR 100")
    plain = make_image(CTImageStorage, study3, generate_uid(), "P3", "Rle^Rita", "CT", 1)
    files = {
        "ct": save(ct, d / "ct.dcm", ExplicitVRLittleEndian),
        "mr": save(mr, d / "mr.dcm", ImplicitVRLittleEndian),
        "latin": save(latin, d / "latin.dcm", ExplicitVRLittleEndian),
    }
    plain_path = save(plain, d / "plain.dcm", ExplicitVRLittleEndian)
    run(["dcmcrle", plain_path, d / "rle.dcm"])
    files["rle"] = d / "rle.dcm"
    assert pydicom.dcmread(str(files["rle"])).file_meta.TransferSyntaxUID == RLELossless
    assert b"M\xfcller" in (d / "latin.dcm").read_bytes()  # really Latin-1 on disk
    uids = {k: pydicom.dcmread(str(v)) for k, v in files.items()}
    return {"dir": d, "files": files, "ds": uids,
            "study1": study1, "study2": study2, "study3": study3}


class Scp:
    """A bit-preserving storescp writing into its own directory."""

    def __init__(self, directory, aet, accept_all):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = spcluster.free_port()
        args = ["storescp", "--bit-preserving", "-aet", aet, "-od", self.dir, "-uf"]
        if accept_all:
            args.append("+xa")
        args.append(str(self.port))
        self.proc = subprocess.Popen([str(a) for a in args], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def files(self):
        return {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID: p
                for p in self.dir.iterdir() if p.is_file()}

    def clear(self):
        for p in self.dir.iterdir():
            p.unlink()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def env(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("scp")
    ref = Scp(base / "ref", "REF", True)        # what storescu really sends
    dest = Scp(base / "dest", "DEST", True)     # accepts RLE: verbatim
    plain = Scp(base / "plain", "PLAIN", False)  # uncompressed only: conversion
    proc = subprocess.Popen(
        [str(HARNESS), "--ae", AE, "--acse-timeout", "10",
         f"DEST=127.0.0.1:{dest.port}", f"PLAIN=127.0.0.1:{plain.port}",
         f"DEAD=127.0.0.1:{spcluster.free_port()}"],
        env=ENV, stdout=subprocess.PIPE, stderr=open(base / "harness.log", "w"), text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"harness did not print a port: {line!r}"
    port = int(line)
    files = data["files"]
    # Same storescu invocations to the reference and to the adapter. The RLE
    # file needs -xr (storescu does not propose RLE otherwise) and the MR -xi
    # (otherwise storescu converts it to explicit VR).
    for target, aec in ((ref.port, "REF"), (port, AE)):
        run(["storescu", "-aec", aec, "127.0.0.1", target, files["ct"], files["latin"]])
        run(["storescu", "-xi", "-aec", aec, "127.0.0.1", target, files["mr"]])
        run(["storescu", "-xr", "-aec", aec, "127.0.0.1", target, files["rle"]])
    yield {"port": port, "ref": ref, "dest": dest, "plain": plain, "proc": proc, "base": base}
    proc.terminate()
    rc = proc.wait(timeout=30)
    for s in (ref, dest, plain):
        s.stop()
    assert rc == 0, (base / "harness.log").read_text()


def findscu(env, level, keys, outdir, model="-S"):
    outdir.mkdir(parents=True, exist_ok=True)
    for p in outdir.iterdir():
        p.unlink()
    args = ["findscu", model, "-aec", AE, "-X", "-od", outdir, "-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", env["port"]]
    run(args)
    return [pydicom.dcmread(str(p)) for p in sorted(outdir.iterdir())]


def keywords(ds):
    return {el.keyword or str(el.tag) for el in ds}


# ---- tests -------------------------------------------------------------------

def test_echo(env):
    p = run(["echoscu", "-v", "-aec", AE, "127.0.0.1", env["port"]])
    assert "Received Echo Response (Success)" in p.stdout + p.stderr


def test_reference_received_everything(env, data):
    assert set(env["ref"].files()) == {ds.SOPInstanceUID for ds in data["ds"].values()}


def test_find_study_level_keys_and_values(env, data, tmp_path):
    rsps = findscu(env, "STUDY", ["PatientID=P1", "StudyInstanceUID", "PatientName",
                                  "StudyDescription", "ModalitiesInStudy",
                                  "AdmittingDiagnosesDescription"], tmp_path / "f")
    assert len(rsps) == 1
    r = rsps[0]
    assert keywords(r) == {"SpecificCharacterSet", "QueryRetrieveLevel", "PatientID",
                           "StudyInstanceUID", "PatientName", "StudyDescription",
                           "ModalitiesInStudy", "AdmittingDiagnosesDescription"}
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert r.QueryRetrieveLevel == "STUDY"
    assert r.StudyInstanceUID == data["study1"]
    assert str(r.PatientName) == "Doe^John"
    assert r.StudyDescription == "Test study P1"
    assert r.AdmittingDiagnosesDescription == ""  # not indexed: returned empty


def test_find_series_and_image_levels(env, data, tmp_path):
    rsps = findscu(env, "SERIES", [f"StudyInstanceUID={data['study1']}", "SeriesInstanceUID",
                                   "Modality"], tmp_path / "s")
    assert sorted(r.Modality for r in rsps) == ["CT", "MR"]
    assert {r.SeriesInstanceUID for r in rsps} == {data["ds"]["ct"].SeriesInstanceUID,
                                                   data["ds"]["mr"].SeriesInstanceUID}
    for r in rsps:
        assert keywords(r) == {"SpecificCharacterSet", "QueryRetrieveLevel", "StudyInstanceUID",
                               "SeriesInstanceUID", "Modality"}
    mr = data["ds"]["mr"]
    rsps = findscu(env, "IMAGE", [f"StudyInstanceUID={data['study1']}",
                                  f"SeriesInstanceUID={mr.SeriesInstanceUID}", "SOPInstanceUID",
                                  "SOPClassUID", "InstanceNumber"], tmp_path / "i")
    assert len(rsps) == 1
    assert rsps[0].SOPInstanceUID == mr.SOPInstanceUID
    assert rsps[0].SOPClassUID == MRImageStorage
    # Patient Root model, PATIENT level
    rsps = findscu(env, "PATIENT", ["PatientID=P*", "PatientName"], tmp_path / "p", model="-P")
    assert sorted(r.PatientID for r in rsps) == ["P1", "P2", "P3"]
    # no match
    assert findscu(env, "STUDY", ["PatientID=NOBODY", "StudyInstanceUID"], tmp_path / "n") == []


def test_find_latin1_converted_to_utf8(env, data, tmp_path):
    rsps = findscu(env, "STUDY", ["SpecificCharacterSet=ISO_IR 192", "PatientName=Mü*",
                                  "PatientID", "StudyInstanceUID"], tmp_path / "l")
    assert len(rsps) == 1
    r = rsps[0]
    assert r.SpecificCharacterSet == "ISO_IR 192"
    assert str(r.PatientName) == "Müller^Hans"
    assert r.PatientID == "P2"
    # the raw response really is UTF-8
    raw = next((tmp_path / "l").iterdir()).read_bytes()
    assert "Müller".encode("utf-8") in raw


def check_same_as_reference(env, received, expected_uids):
    ref = env["ref"].files()
    assert set(received) == set(expected_uids)
    for uid, path in received.items():
        got = dataset_bytes(path)
        want = dataset_bytes(ref[uid])
        assert got == want, f"{uid}: {len(got)} bytes differ from the {len(want)} stored"


def test_move_is_bit_exact(env, data):
    dest = env["dest"]
    dest.clear()
    p = run(["movescu", "-d", "-S", "-aec", AE, "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['study1']}\\{data['study3']}",
             "127.0.0.1", env["port"]])
    st = statuses(p.stdout + p.stderr)
    assert st and st[-1] == 0x0000, st
    ds = data["ds"]
    check_same_as_reference(env, dest.files(), [ds["ct"].SOPInstanceUID, ds["mr"].SOPInstanceUID,
                                                ds["rle"].SOPInstanceUID])
    rle = pydicom.dcmread(str(dest.files()[ds["rle"].SOPInstanceUID]))
    assert rle.file_meta.TransferSyntaxUID == RLELossless  # sent verbatim, not converted
    mr = pydicom.dcmread(str(dest.files()[ds["mr"].SOPInstanceUID]))
    assert mr.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_move_converts_when_stored_syntax_refused(env, data):
    plain = env["plain"]
    plain.clear()
    p = run(["movescu", "-d", "-S", "-aec", AE, "-aem", "PLAIN", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['study3']}", "127.0.0.1", env["port"]])
    st = statuses(p.stdout + p.stderr)
    assert st and st[-1] == 0x0000, st
    files = plain.files()
    uid = data["ds"]["rle"].SOPInstanceUID
    assert list(files) == [uid]
    got = pydicom.dcmread(str(files[uid]))
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.PixelData == bytes(range(32))  # decoded by DCMTK's RLE decoder


def getscu(env, keys, out, extra=()):
    out.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-d", "+B", "-od", out, "-S", "-aec", AE, *extra]
    for k in keys:
        args += ["-k", k]
    p = run(args + ["127.0.0.1", env["port"]])
    st = statuses(p.stdout + p.stderr)
    return st, {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: f
                for f in out.iterdir()}


def test_get_is_bit_exact(env, data, tmp_path):
    ds = data["ds"]
    # getscu proposes explicit VR first: the CT and the Latin-1 CT (stored so)
    st, received = getscu(env, ["QueryRetrieveLevel=SERIES",
                                f"StudyInstanceUID={data['study1']}\\{data['study2']}",
                                f"SeriesInstanceUID={ds['ct'].SeriesInstanceUID}\\"
                                f"{ds['latin'].SeriesInstanceUID}"], tmp_path / "g1")
    assert st and st[-1] == 0x0000, st
    check_same_as_reference(env, received, [ds["ct"].SOPInstanceUID, ds["latin"].SOPInstanceUID])
    # getscu 3.6.7 proposes only explicit VR little endian for storage (its
    # +xi has no effect there), so the MR, stored in implicit VR, is converted
    st, received = getscu(env, ["QueryRetrieveLevel=SERIES",
                                f"StudyInstanceUID={data['study1']}",
                                f"SeriesInstanceUID={ds['mr'].SeriesInstanceUID}"],
                          tmp_path / "g2")
    assert st and st[-1] == 0x0000, st
    got = pydicom.dcmread(str(received[ds["mr"].SOPInstanceUID]))
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.PixelData == bytes(range(32)) and str(got.PatientName) == "Doe^John"


def test_get_converts_compressed(env, data, tmp_path):
    st, received = getscu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data['study3']}"],
                          tmp_path / "g3")
    assert st and st[-1] == 0x0000, st
    uid = data["ds"]["rle"].SOPInstanceUID
    assert list(received) == [uid]
    got = pydicom.dcmread(str(received[uid]))
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.PixelData == bytes(range(32))


def test_move_unknown_destination(env, data):
    p = run(["movescu", "-d", "-S", "-aec", AE, "-aem", "NOWHERE", "-k",
             "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={data['study1']}",
             "127.0.0.1", env["port"]], check=False)
    assert statuses(p.stdout + p.stderr)[-1] == 0xA801


def test_move_unreachable_destination_fails(env, data):
    p = run(["movescu", "-d", "-S", "-aec", AE, "-aem", "DEAD", "-k",
             "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={data['study1']}",
             "127.0.0.1", env["port"]], check=False)
    assert statuses(p.stdout + p.stderr)[-1] == 0xA702


def test_store_missing_study_uid_is_refused(env, data):
    ds = make_image(CTImageStorage, generate_uid(), generate_uid(), "P9", "No^Study", "CT", 1)
    del ds.StudyInstanceUID
    path = save(ds, data["dir"] / "nostudy.dcm", ExplicitVRLittleEndian)
    p = run(["storescu", "-d", "-aec", AE, "127.0.0.1", env["port"], path], check=False)
    out = p.stdout + p.stderr
    assert statuses(out)[-1] == 0xC000, out
    assert "StudyInstanceUID missing" in out
    rsps = findscu(env, "PATIENT", ["PatientID=P9"], data["dir"] / "nostudy", model="-P")
    assert rsps == []


# ---- a minimal raw DICOM client for requests DCMTK tools refuse to send ------

def raw_store(port, command_sop_uid, dataset_bytes_ile, sop_class=CTImageStorage):
    """One C-STORE in implicit VR little endian through spcluster's raw
    client; returns (status, comment)."""
    return spcluster.raw_store(port, sop_class, command_sop_uid, dataset_bytes_ile, ae=AE)


def _image_ile(ds):
    ds.is_little_endian = True
    ds.is_implicit_VR = True
    return spcluster.encode_dataset(ds)


def test_store_missing_sop_instance_uid_is_refused(env):
    ds = make_image(CTImageStorage, generate_uid(), generate_uid(), "P8", "No^Sop", "CT", 1)
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    status, comment = raw_store(env["port"], uid, _image_ile(ds))
    assert status & 0xF000 == 0xC000, hex(status)
    assert "SOPInstanceUID" in comment


def test_store_sop_instance_uid_mismatch(env):
    # stored in the end: a patient ID outside the PatientID=P* query of
    # test_find_series_and_image_levels, whichever runs first
    ds = make_image(CTImageStorage, generate_uid(), generate_uid(), "Q7", "Mis^Match", "CT", 1)
    status, comment = raw_store(env["port"], generate_uid(), _image_ile(ds))
    assert status == 0xA900, hex(status)
    assert "differs" in comment
    # and a well-formed one through the same client succeeds
    status, _ = raw_store(env["port"], ds.SOPInstanceUID, _image_ile(ds))
    assert status == 0x0000


def test_silent_clients_do_not_block_echo(env):
    silent = [socket.create_connection(("127.0.0.1", env["port"])) for _ in range(3)]
    try:
        time.sleep(0.2)  # the silent connections are accepted first
        p = run(["echoscu", "-v", "-aec", AE, "127.0.0.1", env["port"]], timeout=5)
        assert "Received Echo Response (Success)" in p.stdout + p.stderr
    finally:
        for s in silent:
            s.close()


# ---- a second, small harness: cancel and the connection limit -----------------

@pytest.fixture
def small(data, tmp_path):
    """A harness with 1 worker, a queue of 1, a short ACSE timeout and a slow
    C-FIND, holding the four test instances."""
    log = open(tmp_path / "small.log", "w")
    proc = subprocess.Popen([str(HARNESS), "--ae", AE, "--workers", "1", "--queue", "1",
                             "--acse-timeout", "4", "--find-delay-ms", "300"],
                            env=ENV, stdout=subprocess.PIPE, stderr=log, text=True)
    port = int(proc.stdout.readline())
    files = data["files"]
    run(["storescu", "-aec", AE, "127.0.0.1", port, files["ct"], files["latin"], files["mr"]])
    run(["storescu", "-xr", "-aec", AE, "127.0.0.1", port, files["rle"]])
    yield port
    proc.terminate()
    rc = proc.wait(timeout=30)
    log.close()
    assert rc == 0, (tmp_path / "small.log").read_text()


def test_find_cancel(small, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    p = run(["findscu", "-d", "-S", "-aec", AE, "--cancel", "1", "-X", "-od", out,
             "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID", "127.0.0.1", small])
    st = statuses(p.stdout + p.stderr)
    assert st[-1] == 0xFE00, st
    assert 1 <= len(list(out.iterdir())) < 4


def test_connections_beyond_queue_are_rejected(small, tmp_path):
    # A slow C-FIND holds the only worker and a second one fills the queue.
    # (Silent connections no longer take a worker or a queue place: the gate
    # holds them until a whole request arrives; see test_front_door.py.)
    finds = []
    try:
        for i in range(2):
            out = tmp_path / f"busy{i}"
            out.mkdir()
            finds.append(subprocess.Popen(
                ["findscu", "-S", "-aec", AE, "-X", "-od", str(out), "-k",
                 "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID", "127.0.0.1", str(small)],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.3)  # the first is being served, the second waits in the queue
        p = run(["echoscu", "-aec", AE, "127.0.0.1", small], check=False, timeout=10)
        out = p.stdout + p.stderr
        assert p.returncode != 0
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    finally:
        for f in finds:
            assert f.wait(timeout=30) == 0
    time.sleep(0.3)
    p = run(["echoscu", "-v", "-aec", AE, "127.0.0.1", small], timeout=10)
    assert "Received Echo Response (Success)" in p.stdout + p.stderr


# ---- character sets: every valid image is archived, names are indexed --------

CHARSET_DIR = Path("/usr/lib/python3/dist-packages/pydicom/data/charset_files")
# Files pydicom ships, one per SOP Instance UID (chrFrenMulti and
# chrJapMultiExplicitIR6 repeat another file's UID with other bytes).
CHARSET_FILES = ["chrArab", "chrFren", "chrGerm", "chrGreek", "chrH31", "chrH32", "chrHbrw",
                 "chrI2", "chrJapMulti", "chrKoreanMulti", "chrRuss", "chrX1", "chrX2"]


def _name(value):
    """A person name as compared here: trailing empty component groups and
    padding dropped (pydicom keeps 'A^B==' where the index keeps 'A^B')."""
    return str(value).rstrip("= ")


def find_name_of(env, sop_uid, outdir):
    rsps = findscu(env, "IMAGE", ["StudyInstanceUID", "SeriesInstanceUID",
                                  f"SOPInstanceUID={sop_uid}", "PatientName"], outdir)
    assert len(rsps) == 1, f"{sop_uid}: {len(rsps)} answers"
    assert rsps[0].SpecificCharacterSet == "ISO_IR 192"
    return _name(rsps[0].PatientName)


def test_store_accepts_every_character_set_and_indexes_names(env, tmp_path):
    """Japanese (ISO 2022 IR 87, IR 13 + IR 87), Korean (IR 149), Chinese
    (GB18030, UTF-8), Arabic, Greek, Hebrew, Cyrillic, Latin-1: all stored
    with Success (glibc's iconv has no 'ISO 2022 IR 87', which used to refuse
    every Japanese image) and findable with the name decoded to UTF-8."""
    paths = [CHARSET_DIR / f"{n}.dcm" for n in CHARSET_FILES]
    p = run(["storescu", "-d", "-aec", AE, "127.0.0.1", env["port"]] + paths)
    got = statuses(p.stdout + p.stderr)
    assert got == [0] * len(paths), got
    for path in paths:
        ds = pydicom.dcmread(str(path))
        assert find_name_of(env, ds.SOPInstanceUID, tmp_path / path.stem) == \
            _name(ds.PatientName), path.name


def _raw_name_image(name_bytes, charset=None):
    """An explicit VR little endian image whose PatientName is exactly
    name_bytes (explicit, because getscu 3.6.7 receives only that: the
    retrieved bytes are then the stored ones, verbatim)."""
    placeholder = "Q" * (len(name_bytes) - 5) + "^Hans"
    assert len(placeholder) == len(name_bytes)
    ds = make_image(CTImageStorage, generate_uid(), generate_uid(), "PCS", placeholder, "CT", 1,
                    charset=charset)
    raw = spcluster.encode_dataset(ds, implicit=False)
    assert raw.count(placeholder.encode()) == 1
    return ds, raw.replace(placeholder.encode(), name_bytes)


@pytest.mark.parametrize("charset, name_bytes, expected", [
    (None, b"M\xfcller^Hans", "Müller^Hans"),           # Latin-1 bytes, no character set
    ("iso_ir 100", b"M\xfcller^Hans", "Müller^Hans"),   # lower-case defined term
    ("ISO_IR 999", b"M\xfcller^Hans", None),            # unknown term: escaped, never refused
    ("ISO_IR 192", b"M\xfc\xfcler^Hans", None),          # invalid UTF-8: escaped, never refused
])
def test_store_never_refuses_an_image_over_its_names(env, tmp_path, charset, name_bytes,
                                                     expected):
    ds, raw = _raw_name_image(name_bytes, charset)
    status, comment = spcluster.raw_store(env["port"], CTImageStorage, ds.SOPInstanceUID, raw,
                                          ae=AE, transfer_syntax=ExplicitVRLittleEndian)
    assert status == 0x0000, (hex(status), comment)
    name = find_name_of(env, ds.SOPInstanceUID, tmp_path / "f")
    if expected is not None:
        assert name == expected
    else:
        # what could not be decoded is indexed in charset.h's escaped form
        # (U+FFFD then the byte in hex), the rest as it was
        assert name.startswith("M\ufffdFC") and name.endswith("ler^Hans"), name
    # the archive keeps the bytes it was given
    outdir = tmp_path / "get"
    outdir.mkdir()
    run(["getscu", "+B", "-aec", AE, "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
         "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
         "-k", f"SOPInstanceUID={ds.SOPInstanceUID}", "-od", outdir, "127.0.0.1", env["port"]])
    (got,) = list(outdir.iterdir())
    assert dataset_bytes(got) == raw
