"""DICOMweb on the router (router/http.c, router/dicomweb.c, router/auth.c),
driven by real HTTP clients only: python-requests and curl, with pydicom
parsing what comes back.

Layout:
* `web`: one module-scoped cluster (3 nodes, N=3, W=2, one router) whose
  router serves HTTPS with a self-signed certificate, authentication on (a
  users file written by `shardpacs-router user add`, a token key by
  `shardpacs-router token-key`), and a static viewer directory. The whole
  deterministic test set (tests/cluster/dataset.py: 48 instances, 11 studies,
  6 transfer syntaxes, 3 character sets) plus multi-frame objects made here
  are stored through STOW-RS once; the read-only tests share it and compare
  against the files that were sent (data set after the meta header).
* Fault and abuse tests that change the cluster get their own small
  cluster, with authentication off.

Run: /usr/bin/python3 -m pytest -q tests/cluster/test_dicomweb.py
(programs from SP_BUILD_DIR, by default the repository's build/)
"""
import gzip
import io
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as gen  # noqa: E402
import spcluster as sc  # noqa: E402

USER, PASSWORD = "alice", "correct horse battery"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FAST = {"store_timeout": "2s", "query_timeout": "8s", "fetch_timeout": "8s",
        "retry_down": "60s"}
DICOM_JSON = "application/dicom+json"
OCTET_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


# ---- helpers -----------------------------------------------------------------------------

def multipart_body(objects, boundary=None, leading_crlf=True, part_type="application/dicom"):
    """A multipart/related body with one part per bytes object; returns
    (body, boundary)."""
    boundary = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    if leading_crlf:
        out.write(b"\r\n")
    for obj in objects:
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(obj)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), boundary


def parse_multipart(resp):
    """[(part headers dict, body bytes)] of a multipart/related response,
    checking the layout browsers' parsers need: no preamble, headers written
    exactly `Content-Type:`, a closing boundary."""
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    assert m, ctype
    b = m.group(1).encode()
    data = resp.content
    assert data.startswith(b"--" + b + b"\r\n"), data[:80]
    assert data.endswith(b"--" + b + b"--\r\n"), data[-80:]
    parts = []
    chunks = data.split(b"--" + b)
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, _, body = chunk[2:-2].partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            headers[k] = v.strip()
        parts.append((headers, body))
    assert chunks[-1] == b"--\r\n"
    return parts


def after_meta(raw: bytes) -> bytes:
    """The data set bytes of a Part-10 object (after its meta group)."""
    assert raw[128:132] == b"DICM"
    (glen,) = np.frombuffer(raw[140:144], "<u4")
    return raw[144 + int(glen):]


def values(obj, tag):
    return obj.get(tag, {}).get("Value", [])


def uid_set(results, tag):
    return {values(r, tag)[0] for r in results}


def self_signed(directory: Path):
    key, cert = directory / "tls.key", directory / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def multiframe_native(path: Path, frames=4, rows=64, cols=48):
    """A native explicit-VR multi-frame CT with distinct frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = gen.CT_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Frames^Multi", "MF001", "CT"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240202", 1, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # Noise: compressed, each frame still spans several 1 KiB fragments.
    rng = np.random.default_rng(7)
    pix = rng.integers(0, 4096, size=(frames, rows, cols), dtype="<u2")
    ds.PixelData = pix.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return pix


class Web:
    """The shared HTTPS cluster and what was stored through it."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.cert, key = self_signed(root)
        users, self.token_key = root / "users", root / "token.key"
        env = dict(SHARDPACS_PASSWORD=PASSWORD)
        sc.run_cli  # noqa: B018 (spcluster imported for its programs)
        subprocess.run([str(sc.ROUTER_BIN), "user", "add", str(users), USER], check=True,
                       env=env, capture_output=True)
        subprocess.run([str(sc.ROUTER_BIN), "token-key", str(self.token_key)], check=True,
                       capture_output=True)
        self.viewer = root / "viewer"
        (self.viewer / "assets").mkdir(parents=True)
        (self.viewer / "index.html").write_text("<html>viewer</html>")
        (self.viewer / "assets" / "app.js").write_text("console.log(1)")
        self.port = sc.free_port()
        http = {"port": str(self.port), "bind": "127.0.0.1", "tls_cert": str(self.cert),
                "tls_key": str(key), "users": str(users), "token_key": str(self.token_key),
                "viewer_dir": str(self.viewer), "cors_origins": "*"}
        self.cluster = sc.cluster(root / "c", nodes=3, cluster_opts=FAST,
                                  router_extra={"http": http})
        sc.wait_port(self.port)
        self.base = f"https://127.0.0.1:{self.port}/dicom-web"
        self.s = requests.Session()
        self.s.verify = str(self.cert)
        self.s.trust_env = False  # else REQUESTS_CA_BUNDLE overrides verify (requests #3829)
        self.s.auth = (USER, PASSWORD)
        self.ds = gen.make_test_set(root / "testset")
        self.paths = {r["SOPInstanceUID"]: Path(r["path"]) for r in self.ds.records}
        # Multi-frame objects: native, and JPEG lossless with several
        # fragments per frame, with and without a Basic Offset Table.
        mf = root / "mf"
        mf.mkdir()
        self.mf_pixels = multiframe_native(mf / "native.dcm")
        # The same pixels as other instances (new SOP Instance UIDs).
        for name in ("native2", "native3"):
            d = pydicom.dcmread(str(mf / "native.dcm"))
            d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            d.save_as(str(mf / f"{name}.dcm"))
        gen.run_tool(["dcmcjpeg", "+e1", "+fs", "1", "+ot", str(mf / "native2.dcm"),
                      str(mf / "jll_bot.dcm")])
        gen.run_tool(["dcmcjpeg", "+e1", "+fs", "1", "-ot", str(mf / "native3.dcm"),
                      str(mf / "jll_nobot.dcm")])
        for name in ("native.dcm", "jll_bot.dcm", "jll_nobot.dcm"):
            p = mf / name
            self.paths[pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID] = p
        self.mf = {n: mf / f"{n}.dcm" for n in ("native", "jll_bot", "jll_nobot")}

    def url(self, path):
        return self.base + path

    def stop(self):
        self.cluster.stop()


def stow(session, url, objects, **kw):
    body, boundary = multipart_body(objects, **kw)
    return session.post(url, data=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"',
        "Accept": DICOM_JSON})


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    w = Web(tmp_path_factory.mktemp("web"))
    try:
        # Everything goes in through STOW-RS: the test set in two requests,
        # one of them per study to /studies/{study}.
        paths = list(w.paths.values())
        first_study = w.ds.records[0]["StudyInstanceUID"]
        in_first = [Path(r["path"]) for r in w.ds.records
                    if r["StudyInstanceUID"] == first_study]
        r = stow(w.s, w.url(f"/studies/{first_study}"), [p.read_bytes() for p in in_first])
        assert r.status_code == 200, r.text
        rest = [p for p in paths if p not in in_first]
        r = stow(w.s, w.url("/studies"), [p.read_bytes() for p in rest], leading_crlf=False)
        assert r.status_code == 200, r.text
        w.stow_answer = r.json()
        yield w
    finally:
        w.stop()


# ---- STOW-RS and WADO-RS ------------------------------------------------------------------

def test_stow_answer_lists_every_instance(web):
    refs = values(web.stow_answer, "00081199")
    sent = len(web.paths) - sum(1 for r in web.ds.records
                                if r["StudyInstanceUID"] == web.ds.records[0]["StudyInstanceUID"])
    assert len(refs) == sent
    for item in refs:
        sop = values(item, "00081155")[0]
        assert sop in web.paths
        url = values(item, "00081190")[0]
        assert url.startswith(web.base + "/studies/") and url.endswith("/instances/" + sop)
    assert "00081198" not in web.stow_answer


def test_wado_study_retrieval_is_bit_exact(web):
    """Every study retrieved whole: each part is the stored Part-10 object,
    whose data set is byte for byte the data set that was sent."""
    studies = {r["StudyInstanceUID"] for r in web.ds.records}
    seen = set()
    for study in studies:
        r = web.s.get(web.url(f"/studies/{study}"),
                      headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200, r.text
        for headers, body in parse_multipart(r):
            assert headers["Content-Type"].startswith("application/dicom")
            ds = pydicom.dcmread(io.BytesIO(body))
            sop = ds.SOPInstanceUID
            assert after_meta(body) == gen.dataset_bytes_after_meta(web.paths[sop]), sop
            assert ds.file_meta.TransferSyntaxUID in headers["Content-Type"]
            seen.add(sop)
    assert seen == {r["SOPInstanceUID"] for r in web.ds.records}


def test_wado_series_and_instance_retrieval(web):
    rec = web.ds.records[-1]
    st, se, sop = rec["StudyInstanceUID"], rec["SeriesInstanceUID"], rec["SOPInstanceUID"]
    r = web.s.get(web.url(f"/studies/{st}/series/{se}"))
    parts = parse_multipart(r)
    assert len(parts) == sum(1 for x in web.ds.records if x["SeriesInstanceUID"] == se)
    r = web.s.get(web.url(f"/studies/{st}/series/{se}/instances/{sop}"),
                  headers={"Accept": 'multipart/related; type=application/dicom; '
                                     'transfer-syntax=*'})
    (headers, body), = parse_multipart(r)
    assert after_meta(body) == gen.dataset_bytes_after_meta(web.paths[sop])
    # Unknown instance: 404; another transfer syntax than stored: 406.
    assert web.s.get(web.url(f"/studies/{st}/series/{se}/instances/1.2.3.4")).status_code == 404
    other = "1.2.840.10008.1.2.4.50" if rec["TransferSyntaxUID"] != "1.2.840.10008.1.2.4.50" \
        else EXPLICIT_LE
    r = web.s.get(web.url(f"/studies/{st}/series/{se}/instances/{sop}"),
                  headers={"Accept": f'multipart/related; type="application/dicom"; '
                                     f'transfer-syntax={other}'})
    assert r.status_code == 406


def test_stow_again_is_idempotent_and_other_bytes_conflict(web):
    rec = web.ds.records[0]
    raw = web.paths[rec["SOPInstanceUID"]].read_bytes()
    r = stow(web.s, web.url("/studies"), [raw])
    assert r.status_code == 200, r.text
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.StudyDescription = "changed"
    out = io.BytesIO()
    ds.save_as(out)
    r = stow(web.s, web.url("/studies"), [out.getvalue()])
    assert r.status_code == 409
    failed = values(r.json(), "00081198")
    assert values(failed[0], "00081197") == [0x0111]
    assert values(failed[0], "00081155") == [rec["SOPInstanceUID"]]


# ---- QIDO-RS against C-FIND ----------------------------------------------------------------

QUERIES = [
    ("STUDY", {}),
    ("STUDY", {"PatientID": "SPT0001"}),
    ("STUDY", {"PatientName": "m*"}),
    ("STUDY", {"StudyDate": "20000101-20221231"}),
    ("STUDY", {"StudyDate": "-19991231"}),
    ("STUDY", {"ModalitiesInStudy": "MR"}),
    ("STUDY", {"AccessionNumber": "ACC*"}),
    ("SERIES", {"Modality": "CT"}),
    ("IMAGE", {"SOPClassUID": gen.CT_IMAGE}),
]


def qido_path(level):
    return {"STUDY": "/studies", "SERIES": "/series", "IMAGE": "/instances"}[level]


@pytest.mark.parametrize("level,keys", QUERIES)
def test_qido_answers_like_cfind(web, level, keys, tmp_path):
    unique = {"STUDY": ("StudyInstanceUID", "0020000D"),
              "SERIES": ("SeriesInstanceUID", "0020000E"),
              "IMAGE": ("SOPInstanceUID", "00080018")}[level]
    r = web.s.get(web.url(qido_path(level)), params=keys)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith(DICOM_JSON)
    got = r.json()
    found = gen.run_findscu("127.0.0.1", web.cluster.router.port, level,
                            {**{k: v for k, v in keys.items()}, unique[0]: ""}, tmp_path,
                            aec="SHARDPACS")
    want = {f[unique[0]] for f in found}
    assert uid_set(got, unique[1]) == want
    # Only what was stored through STOW (test set + multi-frames) can match.
    assert want


def test_qido_values_and_encoding(web):
    rec = web.ds.records[0]
    r = web.s.get(web.url("/studies"), params={"StudyInstanceUID": rec["StudyInstanceUID"],
                                               "includefield": "00081030,00080060"})
    (study,) = r.json()
    assert list(study) == sorted(study)  # keys sorted, 8 hex digits
    assert all(re.fullmatch(r"[0-9A-F]{8}", k) for k in study)
    assert values(study, "00100010") == [{"Alphabetic": rec["PatientName"]}]
    assert study["00100010"]["vr"] == "PN"
    assert values(study, "00081030") == [rec["StudyDescription"]]
    expected = [s for s in web.ds.studies() if s["StudyInstanceUID"] == rec["StudyInstanceUID"]][0]
    assert values(study, "00201208") == [int(expected["NumberOfStudyRelatedInstances"])]
    # Modality asked at study level is answered from ModalitiesInStudy.
    assert values(study, "00080061") == expected["ModalitiesInStudy"].split("\\")
    r = web.s.get(web.url(f"/studies/{rec['StudyInstanceUID']}/series"))
    for series in r.json():
        for tag in ("0020000E", "00080060", "00200011", "00080021", "0008103E", "00201209"):
            assert tag in series, tag


def test_qido_tolerates_what_viewers_send(web):
    pid = web.ds.records[0]["PatientID"]
    base = {"limit": "101", "offset": "0", "fuzzymatching": "false",
            "includefield": "00081030,00080060,00080090,00100030"}
    r = web.s.get(web.url("/studies"), params={**base, "00100020": pid, "Unknown": "x",
                                                "0009ABCD": "y", "zz.bad": "1"})
    assert r.status_code == 200
    assert {values(s, "00100020")[0] for s in r.json()} == {pid}
    # UID lists, backslash or comma separated.
    uids = sorted({x["StudyInstanceUID"] for x in web.ds.records})[:3]
    for sep in ("\\", ","):
        r = web.s.get(web.url("/studies"), params={"StudyInstanceUID": sep.join(uids)})
        assert uid_set(r.json(), "0020000D") == set(uids)
    # Paging: limit/offset walk the same ordered result without overlap.
    everything = [values(s, "0020000D")[0] for s in web.s.get(web.url("/studies")).json()]
    pages = []
    for off in range(0, len(everything), 4):
        pages += [values(s, "0020000D")[0] for s in
                  web.s.get(web.url("/studies"), params={"limit": 4, "offset": off}).json()]
    assert pages == everything
    # includefield=all, an empty answer, and a malformed value.
    r = web.s.get(web.url("/series"), params={"includefield": "all", "limit": "1"})
    assert len(r.json()) == 1 and "00100010" in r.json()[0]
    r = web.s.get(web.url("/studies"), params={"PatientID": "nobody-has-this"})
    assert r.status_code == 200 and r.json() == []
    r = web.s.get(web.url("/studies"), params={"StudyDate": "not-a-date"})
    assert r.status_code == 400 and "StudyDate" in r.json()["error"]


# ---- metadata, frames, bulk data, rendered -----------------------------------------------

def test_series_metadata(web):
    rec = next(r for r in web.ds.records if r["Modality"] == "CT")
    st, se = rec["StudyInstanceUID"], rec["SeriesInstanceUID"]
    url = web.url(f"/studies/{st}/series/{se}/metadata")
    r = web.s.get(url, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(DICOM_JSON)
    meta = r.json()
    members = [x for x in web.ds.records if x["SeriesInstanceUID"] == se]
    assert {values(m, "00080018")[0] for m in meta} == {x["SOPInstanceUID"] for x in members}
    for m in meta:
        sop = values(m, "00080018")[0]
        ref = pydicom.dcmread(str(web.paths[sop]))
        assert values(m, "00083002") == [ref.file_meta.TransferSyntaxUID]
        assert values(m, "00280010") == [ref.Rows]
        assert "00081032" in m  # a sequence, with its items
        pixel = m["7FE00010"]["BulkDataURI"]
        assert pixel == f"{web.base}/studies/{st}/series/{se}/instances/{sop}/bulkdata/7FE00010"
        # Every data set attribute is there (not a reduced set).
        for elem in ref:
            if elem.tag.element != 0:
                assert f"{elem.tag:08X}" in m, (sop, elem.tag)
    # ETag: the same listing is not sent again; gzip when asked.
    etag = r.headers["ETag"]
    r2 = web.s.get(url, headers={"If-None-Match": etag})
    assert r2.status_code == 304
    r3 = web.s.get(url, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r3.headers.get("Content-Encoding") == "gzip"
    assert json.loads(gzip.decompress(r3.raw.read())) == meta
    # Study level: every instance of the study.
    r = web.s.get(web.url(f"/studies/{st}/metadata"))
    assert len(r.json()) == sum(1 for x in web.ds.records if x["StudyInstanceUID"] == st)


def test_series_metadata_reads_no_pixels(web):
    """Nodes keep each instance's metadata at ingest: serving a series'
    metadata (uncached: a router-side cache hit would prove nothing, so the
    request asks under a base URL not seen before) reads no object bytes on
    any node, and gives the same JSON as before."""
    rec = next(r for r in web.ds.records if r["Modality"] == "CT")
    st, se = rec["StudyInstanceUID"], rec["SeriesInstanceUID"]
    url = web.url(f"/studies/{st}/series/{se}/metadata")
    key = web.cluster.admin_key

    def read_bytes():
        return sum(n.stats(key)["object_bytes_read"] for n in web.cluster.nodes)

    before = read_bytes()
    r = web.s.get(url, headers={"Forwarded": "host=meta-test.example;proto=https"})
    assert r.status_code == 200
    meta = r.json()
    assert read_bytes() == before
    assert all(n.stats(key)["metadata_rebuilt"] == 0 for n in web.cluster.nodes)
    members = [x for x in web.ds.records if x["SeriesInstanceUID"] == se]
    assert len(meta) == len(members)
    for m in meta:
        sop = values(m, "00080018")[0]
        ref = pydicom.dcmread(str(web.paths[sop]))
        assert values(m, "00280010") == [ref.Rows]
        assert m["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/bulkdata/7FE00010")
        for elem in ref:
            if elem.tag.element != 0:
                assert f"{elem.tag:08X}" in m, (sop, elem.tag)


def instance_path(web, sop):
    ds = pydicom.dcmread(str(web.paths[sop]), stop_before_pixels=True)
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{sop}"


def expected_frames(path):
    ds = pydicom.dcmread(str(path))
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(pydicom.encaps.generate_pixel_data_frame(ds.PixelData, n))
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]


def test_frames_in_every_stored_syntax(web):
    """Frame 1 of one instance per transfer syntax, as stored: the part
    header names the syntax, the bytes are the frame's."""
    for ts, paths in web.ds.by_transfer_syntax().items():
        path = next(p for p in paths if "PixelData" in pydicom.dcmread(str(p)))
        sop = pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID
        r = web.s.get(web.url(instance_path(web, sop) + "/frames/1"),
                      headers={"Accept": OCTET_ANY})
        assert r.status_code == 200, (ts, r.text)
        (headers, body), = parse_multipart(r)
        want_ts = EXPLICIT_LE if ts == "1.2.840.10008.1.2.2" else ts
        assert headers == {"Content-Type": f"application/octet-stream; transfer-syntax={want_ts}"}
        assert body == expected_frames(path)[0], ts


def test_multiframe_frames(web):
    for name, path in web.mf.items():
        sop = pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID
        want = expected_frames(path)
        assert len(want) == 4
        if name != "native":  # several fragments per frame (item tags, roughly)
            assert pydicom.dcmread(str(path)).PixelData.count(b"\xfe\xff\x00\xe0") > 8
        r = web.s.get(web.url(instance_path(web, sop) + "/frames/3,1,4"),
                      headers={"Accept": OCTET_ANY})
        assert r.status_code == 200, (name, r.text)
        assert [b for _, b in parse_multipart(r)] == [want[2], want[0], want[3]], name
        assert web.s.get(web.url(instance_path(web, sop) + "/frames/5"),
                         headers={"Accept": OCTET_ANY}).status_code == 404
    # Asked uncompressed, a lossless JPEG frame comes back decoded.
    sop = pydicom.dcmread(str(web.mf["jll_bot"]), stop_before_pixels=True).SOPInstanceUID
    r = web.s.get(web.url(instance_path(web, sop) + "/frames/2"), headers={
        "Accept": f'multipart/related; type="application/octet-stream"; '
                  f'transfer-syntax={EXPLICIT_LE}'})
    (headers, body), = parse_multipart(r)
    assert headers["Content-Type"].endswith(EXPLICIT_LE)
    assert body == web.mf_pixels[1].tobytes()
    assert web.s.get(web.url(instance_path(web, sop) + "/frames/x")).status_code == 400


def test_bulkdata_and_rendered(web):
    sop = pydicom.dcmread(str(web.mf["native"]), stop_before_pixels=True).SOPInstanceUID
    meta = web.s.get(web.url(instance_path(web, sop) + "/metadata")).json()[0]
    r = web.s.get(meta["7FE00010"]["BulkDataURI"], headers={"Accept": OCTET_ANY})
    (_, body), = parse_multipart(r)
    assert body == web.mf_pixels.tobytes()
    r = web.s.get(web.url(instance_path(web, sop) + "/rendered"))
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8"
    r = web.s.get(web.url(instance_path(web, sop) + "/frames/2/rendered"),
                  headers={"Accept": "image/png"})
    assert r.headers["Content-Type"] == "image/png" and r.content[:4] == b"\x89PNG"
    ct = next(p for p in web.paths.values() if pydicom.dcmread(str(p)).get("Rows", 0) >= 200)
    sop = pydicom.dcmread(str(ct), stop_before_pixels=True).SOPInstanceUID
    r = web.s.get(web.url(instance_path(web, sop) + "/thumbnail"),
                  headers={"Accept": "image/png"})
    assert r.status_code == 200
    w, h = np.frombuffer(r.content[16:24], ">u4")
    assert max(w, h) <= 128


# ---- security, CORS, the viewer -----------------------------------------------------------

def test_authentication(web):
    plain = requests.Session()
    plain.verify = str(web.cert)
    plain.trust_env = False
    r = plain.get(web.url("/studies"), headers={"Origin": "http://viewer.example"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert r.headers["Access-Control-Allow-Origin"] == "*"  # errors carry CORS too
    assert plain.get(web.url("/studies"), auth=(USER, "wrong")).status_code == 401
    assert plain.get(web.url("/studies"), auth=("mallory", PASSWORD)).status_code == 401
    assert plain.get(web.url("/studies"), auth=(USER, PASSWORD)).status_code == 200
    # A bearer token from POST /auth/token, verified by the router alone.
    r = plain.post(f"https://127.0.0.1:{web.port}/auth/token", auth=(USER, PASSWORD))
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert r.json()["expires_in"] > 0
    bearer = {"Authorization": f"Bearer {token}"}
    assert plain.get(web.url("/studies"), headers=bearer).status_code == 200
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert plain.get(web.url("/studies"),
                     headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    # A token with another user name but the old signature fails too.
    head, payload, mac = token.split(".")
    other = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    assert plain.get(web.url("/studies"), headers={
        "Authorization": f"Bearer {head}.{other}.{mac}"}).status_code == 401
    assert plain.post(f"https://127.0.0.1:{web.port}/auth/token").status_code == 401
    # curl as a real client: Basic over TLS.
    out = subprocess.run(["curl", "-s", "--cacert", str(web.cert), "-u", f"{USER}:{PASSWORD}",
                          "-o", "/dev/null", "-w", "%{http_code}", web.url("/studies")],
                         capture_output=True, text=True, check=True)
    assert out.stdout == "200"
    # Plain HTTP to the HTTPS port does not get data.
    with pytest.raises(requests.exceptions.RequestException):
        r = requests.get(f"http://127.0.0.1:{web.port}/dicom-web/studies", auth=(USER, PASSWORD),
                         timeout=5)
        assert r.status_code >= 400
        raise requests.exceptions.RequestException("refused")
    # Each request is logged with its user, path, study, status, bytes and time.
    log = web.cluster.router.log_text()
    assert re.search(r"http: alice GET /dicom-web/studies study=- status=200 bytes=\d+ .*ms=\d+",
                     log)
    assert re.search(r"http: - GET /dicom-web/studies study=- status=401", log)


def test_cors_preflight(web):
    plain = requests.Session()
    plain.verify = str(web.cert)
    plain.trust_env = False
    r = plain.options(web.url("/studies"), headers={
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept, authorization, content-type"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    allowed = r.headers["Access-Control-Allow-Headers"].lower()
    for h in ("accept", "authorization", "content-type"):
        assert h in allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    r = web.s.get(web.url("/nothing-here"), headers={"Origin": "http://viewer.example"})
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_viewer_static_files(web):
    root = f"https://127.0.0.1:{web.port}/viewer"
    get = lambda p: requests.get(root + p, verify=str(web.cert), allow_redirects=False)  # noqa
    r = get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.text == "<html>viewer</html>"
    r = get("/assets/app.js")
    assert r.headers["Content-Type"].startswith("text/javascript") and "console" in r.text
    r = get("/viewer/1.2.3/series")  # the app's own route: index.html
    assert r.status_code == 200 and r.text == "<html>viewer</html>"
    assert get("/assets/missing.js").status_code == 404
    assert get("/../users").status_code in (400, 404)
    assert get("").status_code == 301


# ---- abuse and faults (own clusters) ---------------------------------------------------------

@pytest.fixture
def open_cluster(tmp_path):
    port = sc.free_port()
    c = sc.cluster(tmp_path / "c", nodes=3, cluster_opts=FAST,
                   router_extra={"http": {"port": str(port), "bind": "127.0.0.1", "auth": "off",
                                          "max_body": "64M"},
                                 "dicom": {"max_object_size": "16M", "max_depth": "16"}})
    sc.wait_port(port)
    c.http = f"http://127.0.0.1:{port}/dicom-web"
    c.http_port = port
    try:
        yield c
    finally:
        c.stop()


def small_instance(study=None, series=None, nested=0, n=0):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = gen.SC_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "AB1", "Abuse^Test", "OT", n
    inner = ds
    for _ in range(nested):
        item = Dataset()
        inner.ContentSequence = Sequence([item])
        inner = item
    ds.is_little_endian, ds.is_implicit_VR = True, False
    out = io.BytesIO()
    ds.save_as(out, write_like_original=False)
    return out.getvalue(), ds


def count_instances(c, study):
    r = requests.get(f"{c.http}/studies/{study}/instances")
    return len(r.json()) if r.status_code == 200 else 0


def test_malformed_requests_get_4xx_and_store_nothing(open_cluster):
    c = open_cluster
    study = generate_uid()
    good, _ = small_instance(study)
    h = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz'}
    # Not multipart, or another part type: 415.
    assert requests.post(f"{c.http}/studies", data=good,
                         headers={"Content-Type": "application/dicom"}).status_code == 415
    assert requests.post(f"{c.http}/studies", data=b"", headers={
        "Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=x'}
    ).status_code == 415
    # No boundary in the body, no closing boundary, garbage after a boundary.
    r = requests.post(f"{c.http}/studies", data=b"x" * 100000, headers=h)
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = requests.post(f"{c.http}/studies", data=b"--xyz\r\nContent-Type: application/dicom\r\n\r\n"
                      + good, headers=h)
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]
    r = requests.post(f"{c.http}/studies", data=b"--xyzJUNK\r\n", headers=h)
    assert r.status_code == 400
    # Parts that are not DICOM, nested too deep, of another study: 409 with reasons.
    deep, _ = small_instance(study, nested=40)
    r = stow(requests, f"{c.http}/studies/{study}",
             [b"not dicom at all" * 10, deep, small_instance()[0]])
    assert r.status_code == 409, r.text
    reasons = [values(f, "00081197")[0] for f in values(r.json(), "00081198")]
    assert reasons == [0xC000, 0xC000, 0xA900]
    # A truncated body: the client stops half-way through its only part.
    body, boundary = multipart_body([good])
    s = socket.create_connection(("127.0.0.1", c.http_port))
    s.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; "
               f"type=\"application/dicom\"; boundary={boundary}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:len(body) // 2])
    s.close()
    # A huge Content-Length: refused before any byte of the body is read.
    s = socket.create_connection(("127.0.0.1", c.http_port))
    s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; "
              b"type=\"application/dicom\"; boundary=b\r\nContent-Length: 99999999999999\r\n\r\n")
    s.settimeout(10)
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    # Bad paths and tags in queries.
    assert requests.get(f"{c.http}/studies/not..a..uid/series").status_code == 400
    assert requests.get(f"{c.http}/studies", params={"ZZZZZZZZ": "1", "(0010,0010)": "x"}
                        ).status_code == 200
    assert requests.get(f"{c.http}/studies", params={"StudyInstanceUID": "1.2.x"}
                        ).status_code == 400
    assert requests.get(f"{c.http}/no/such/thing").status_code == 404
    assert requests.delete(f"{c.http}/studies").status_code in (404, 405)
    # Nothing of any of it was stored; the router still serves.
    time.sleep(0.5)
    assert count_instances(c, study) == 0
    assert c.router.alive()
    r = stow(requests, f"{c.http}/studies/{study}", [good])
    assert r.status_code == 200 and count_instances(c, study) == 1
    sc.dcmtk(["echoscu", "-aec", "SHARDPACS", "127.0.0.1", c.router.port])


def test_node_killed_during_wado_and_stow(open_cluster):
    """With one node of three dead, retrieval reads the other replicas (bit
    exact) and stores still reach W=2; with two dead a store is refused
    (0xA700 in FailedSOPSequence) and never reported stored."""
    c = open_cluster
    study, series = generate_uid(), generate_uid()
    objs = [small_instance(study, series, n=i)[0] for i in range(20)]
    r = stow(requests, f"{c.http}/studies", objs)
    assert r.status_code == 200, r.text
    c.nodes[0].kill9()
    r = requests.get(f"{c.http}/studies/{study}")
    assert r.status_code == 200
    got = {pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID: after_meta(b)
           for _, b in parse_multipart(r)}
    assert sorted(got.values()) == sorted(after_meta(o) for o in objs)
    meta = requests.get(f"{c.http}/studies/{study}/series/{series}/metadata").json()
    assert len(meta) == 20
    more = [small_instance(study, series, n=100 + i)[0] for i in range(5)]
    r = stow(requests, f"{c.http}/studies", more)
    assert r.status_code == 200, r.text
    c.nodes[1].kill9()
    last, ds = small_instance(study, series, n=999)
    r = stow(requests, f"{c.http}/studies", [last])
    assert r.status_code == 409, r.text
    (failed,) = values(r.json(), "00081198")
    assert values(failed, "00081197") == [0xA700]
    assert "00081199" not in r.json()
    # What was acknowledged is all on the survivor, bit-exact (the refused
    # one may be there too: it reached one replica, just not W).
    r = requests.get(f"{c.http}/studies/{study}")
    got = {after_meta(b) for _, b in parse_multipart(r)}
    acknowledged = {after_meta(o) for o in objs + more}
    assert acknowledged <= got <= acknowledged | {after_meta(last)}
    assert c.router.alive()


def test_curl_stow_and_retrieve(open_cluster, tmp_path):
    """curl as the client: STOW a body file with an unquoted boundary, then
    retrieve the instance."""
    c = open_cluster
    raw, ds = small_instance()
    body, boundary = multipart_body([raw], leading_crlf=False)
    (tmp_path / "body").write_bytes(body)
    out = subprocess.run(["curl", "-s", "-X", "POST", "--data-binary", f"@{tmp_path / 'body'}",
                          "-H", f"Content-Type: multipart/related; type=application/dicom; "
                                f"boundary={boundary}",
                          "-w", "\n%{http_code}", f"{c.http}/studies"],
                         capture_output=True, text=True, check=True)
    text, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out.stdout
    assert values(values(json.loads(text), "00081199")[0], "00081155") == [ds.SOPInstanceUID]
    out = subprocess.run(["curl", "-s", "-D", str(tmp_path / "h"), "-o", str(tmp_path / "mp"),
                          f"{c.http}/studies/{ds.StudyInstanceUID}/series/"
                          f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"], check=True)
    data = (tmp_path / "mp").read_bytes()
    assert after_meta(raw) in data
