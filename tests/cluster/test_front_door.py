"""The DICOM front door under hostile peers (router/gate.c and
router/dicom_server.cc, served by tests/tools/dicom_harness): while 200
silent, trickling or idle connections (or 50 slow stores, or 50 released
associations whose peers never close) are held open, a well-behaved
echoscu and storescu keep getting answers; refused negotiations get an
A-ASSOCIATE-RJ; the per-address limit holds. Hostile peers are raw sockets
bound to 127.0.0.2 and up (20 per address), so the good client on
127.0.0.1 stays under [dicom] max_per_address. Every loop is bounded in
count and time; latencies are printed, never asserted tightly.

Run: SP_BUILD_DIR=build /usr/bin/python3 -m pytest -q -s tests/cluster/test_front_door.py
"""
import os
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, generate_uid

import spcluster
from spcluster import _even_uid, _item

BUILD = spcluster.BUILD
HARNESS = BUILD / "dicom_harness"
ENV = dict(os.environ, TCP_NODELAY="1")
AE = "SHARDPACS"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PER_ADDRESS = 20  # hostile connections per source address
ANSWER_BOUND = 5.0  # seconds: generous; the measured latencies are printed


# ---- the harness and a good client ----------------------------------------

def start_harness(tmp_path, *extra):
    log = open(tmp_path / "harness.log", "w")
    proc = subprocess.Popen([str(HARNESS), "--ae", AE, "--acse-timeout", "30",
                             "--dimse-timeout", "60", *map(str, extra)],
                            env=ENV, stdout=subprocess.PIPE, stderr=log, text=True)
    port = int(proc.stdout.readline())
    return proc, port, log


@pytest.fixture
def harness(tmp_path):
    proc, port, log = start_harness(tmp_path)
    yield proc, port
    assert proc.poll() is None, "the harness died"
    proc.terminate()
    rc = proc.wait(timeout=30)
    log.close()
    assert rc == 0, (tmp_path / "harness.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "FD1"
    ds.PatientName = "Front^Door"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.is_little_endian = True
    ds.is_implicit_VR = True
    path = d / "ct.dcm"
    ds.save_as(str(path), write_like_original=False)
    return path


def good_client(port, image, what):
    """echoscu then storescu, three times each; both must succeed. Prints
    the wall time of each run (tool start-up included)."""
    echo, store = [], []
    for _ in range(3):
        t = time.monotonic()
        p = subprocess.run(["echoscu", "-aec", AE, "127.0.0.1", str(port)], env=ENV,
                           capture_output=True, text=True, timeout=ANSWER_BOUND)
        echo.append(time.monotonic() - t)
        assert p.returncode == 0, f"echoscu failed under {what}: {p.stdout}{p.stderr}"
        t = time.monotonic()
        p = subprocess.run(["storescu", "-aec", AE, "127.0.0.1", str(port), str(image)],
                           env=ENV, capture_output=True, text=True, timeout=ANSWER_BOUND)
        store.append(time.monotonic() - t)
        assert p.returncode == 0, f"storescu failed under {what}: {p.stdout}{p.stderr}"
    print(f"\n{what}: echoscu {', '.join(f'{x * 1000:.0f}' for x in echo)} ms; "
          f"storescu {', '.join(f'{x * 1000:.0f}' for x in store)} ms")
    return echo, store


# ---- raw hostile peers ------------------------------------------------------

def assoc_rq(contexts=((1, VERIFICATION), (3, CTImageStorage)), calling="HOSTILE"):
    pres = b""
    for cid, uid in contexts:
        pres += _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, _even_uid(uid)) +
                      _item(0x40, _even_uid(IMPLICIT_LE)))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, _even_uid("1.2.3.4")))
    body = (struct.pack(">HH", 1, 0) + AE.ljust(16).encode() + calling.ljust(16).encode() +
            bytes(32) + _item(0x10, _even_uid("1.2.840.10008.3.1.1.1")) + pres + user)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def recv_pdu(s, timeout=5.0):
    """One whole PDU: (type, body); raises on a closed or silent socket."""
    s.settimeout(timeout)
    return spcluster._recv_pdu(s)


def connect_many(port, n, first_address=2):
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((f"127.0.0.{first_address + i // PER_ADDRESS}", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def associate_many(port, n):
    # One after another: 200 requests at once would overflow the worker
    # queue and be refused (transient), which is the queue doing its job.
    socks = connect_many(port, n)
    for s in socks:
        s.sendall(assoc_rq())
        kind, _ = recv_pdu(s)
        assert kind == 0x02, f"association not accepted (PDU type {kind})"
    return socks


def store_command(sop_uid):
    enc = spcluster.encode_command(spcluster.store_command(CTImageStorage, sop_uid, 1))
    pdv = struct.pack(">IBB", len(enc) + 2, 3, 0x03) + enc
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


@contextmanager
def driving(step, interval):
    """Calls step() every interval seconds on a thread until the block ends."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            step()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=10)


def close_all(socks):
    for s in socks:
        s.close()


def send_quietly(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass


# ---- the attacks --------------------------------------------------------------

def test_silent_connections(harness, image):
    proc, port = harness
    socks = connect_many(port, 200)
    try:
        time.sleep(0.3)
        good_client(port, image, "200 silent connections")
    finally:
        close_all(socks)
    good_client(port, image, "after silent connections")


def test_trickling_association_requests(harness, image):
    proc, port = harness
    socks = connect_many(port, 200)
    rq = assoc_rq()
    sent = [0]

    def step():
        for s in socks:
            send_quietly(s, rq[sent[0]:sent[0] + 1])
        sent[0] += 1

    try:
        with driving(step, 1.0):
            time.sleep(1.5)
            good_client(port, image, "200 trickling A-ASSOCIATE-RQs")
        assert sent[0] < len(rq)  # none of them ever completed its request
    finally:
        close_all(socks)


def test_idle_associations(harness, image):
    proc, port = harness
    socks = associate_many(port, 200)
    try:
        good_client(port, image, "200 idle associations")
    finally:
        close_all(socks)


def test_trickling_data_sets(harness, image):
    proc, port = harness
    socks = associate_many(port, 50)
    for s in socks:
        s.sendall(store_command(generate_uid()))
    pdv = struct.pack(">IBB", 4, 3, 0x00) + b"\x08\x00"
    pdu = struct.pack(">BBI", 4, 0, len(pdv)) + pdv

    def step():
        for s in socks:
            send_quietly(s, pdu)

    try:
        with driving(step, 0.5):
            time.sleep(1.0)
            good_client(port, image, "50 C-STORE data sets in 2-byte PDVs")
    finally:
        close_all(socks)


def test_released_peers_that_never_close(harness, image):
    proc, port = harness
    socks = associate_many(port, 50)
    try:
        t = time.monotonic()
        for s in socks:
            s.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
        for s in socks:
            kind, _ = recv_pdu(s)
            assert kind == 0x06  # A-RELEASE-RP
        # The server closes its end at once instead of waiting for ours.
        for s in socks:
            s.settimeout(5)
            assert s.recv(1) == b""
        print(f"\n50 released associations dropped by the server after "
              f"{(time.monotonic() - t) * 1000:.0f} ms")
        good_client(port, image, "50 released peers holding their sockets open")
    finally:
        close_all(socks)


def test_zero_presentation_contexts_rejected(harness, image):
    proc, port = harness
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(assoc_rq(contexts=()))
        kind, body = recv_pdu(s)
        assert kind == 0x03, f"expected A-ASSOCIATE-RJ, got PDU type {kind}"
        s.settimeout(5)
        assert s.recv(1) == b""  # and the connection is closed, not left waiting
    # Only unsupported contexts: the same.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(assoc_rq(contexts=((1, "1.2.3.4.5.6"),)))
        kind, _ = recv_pdu(s)
        assert kind == 0x03
    good_client(port, image, "after refused negotiations")


def test_garbage_is_closed_at_once(harness, image):
    proc, port = harness
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t < 2.0


def test_per_address_limit(tmp_path, image):
    proc, port, log = start_harness(tmp_path, "--max-per-address", "5")
    socks = []
    try:
        for _ in range(5):
            s = socket.socket()
            s.bind(("127.0.0.77", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        extra = socket.socket()
        extra.bind(("127.0.0.77", 0))
        extra.connect(("127.0.0.1", port))
        extra.settimeout(5)
        try:
            assert extra.recv(1) == b""  # closed at once
        except ConnectionResetError:
            pass
        extra.close()
        for s in socks:  # the five admitted ones are still held
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        good_client(port, image, "a peer address at its limit")
        assert "max_per_address" in (tmp_path / "harness.log").read_text()
    finally:
        close_all(socks)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()


def test_deadlines_cover_whole_requests(tmp_path):
    """A trickle cannot stretch the deadline: a request sent one byte per
    0.4 s is cut at the ACSE timeout (2 s), and a data set trickled in
    2-byte PDVs is aborted at the DIMSE timeout (2 s) plus its bytes at
    min_rate - not the 30 or 180 s DCMTK's per-read timeouts would allow."""
    log = open(tmp_path / "harness.log", "w")
    proc = subprocess.Popen([str(HARNESS), "--ae", AE, "--acse-timeout", "2",
                             "--dimse-timeout", "2", "--min-rate", "1000"],
                            env=ENV, stdout=subprocess.PIPE, stderr=log, text=True)
    port = int(proc.stdout.readline())
    try:
        rq = assoc_rq()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            t = time.monotonic()
            closed = None
            for i in range(30):  # at most 12 s
                try:
                    s.sendall(rq[i:i + 1])
                except OSError:
                    closed = time.monotonic() - t
                    break
                s.settimeout(0.4)
                try:
                    if s.recv(1) == b"":
                        closed = time.monotonic() - t
                        break
                except socket.timeout:
                    pass
                except OSError:
                    closed = time.monotonic() - t
                    break
            print(f"\ntrickled A-ASSOCIATE-RQ closed after {closed:.1f} s")
            assert closed is not None and 1.5 < closed < 4.0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(rq)
            assert recv_pdu(s)[0] == 0x02
            s.sendall(store_command(generate_uid()))
            pdv = struct.pack(">IBB", 4, 3, 0x00) + b"\x08\x00"
            t = time.monotonic()
            ended = None
            for i in range(40):  # at most 12 s
                try:
                    s.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
                except OSError:
                    ended = time.monotonic() - t
                    break
                s.settimeout(0.3)
                try:
                    got = s.recv(16)
                    ended = time.monotonic() - t
                    assert got == b"" or got[0] == 0x07  # closed, or an A-ABORT
                    break
                except socket.timeout:
                    pass
                except OSError:
                    ended = time.monotonic() - t
                    break
            print(f"trickled data set aborted after {ended:.1f} s")
            assert ended is not None and 1.5 < ended < 5.0
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()
