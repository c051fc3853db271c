"""Hostile and oversized input at the DICOM front door (router/dicom_services.cc
with common/dsscan.c, served by tests/tools/dicom_harness): a data set or an
identifier nested thousands of sequences deep is refused before DCMTK's
recursive parser sees it (it used to overflow a worker's stack and kill the
process); a data set over max_object_size is read to its end, discarded and
refused, and the association stays usable; when receive memory is taken by
other receives, a store waits, then answers 0xA700 (retry later), and the
others complete; malformed UIDs are permanent failures (0xC000), not
retry-later ones.

Run: SP_BUILD_DIR=build /usr/bin/python3 -m pytest -q tests/cluster/test_hostile_input.py
"""
import os
import struct
import subprocess
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

import spcluster

HARNESS = spcluster.BUILD / "dicom_harness"
ENV = dict(os.environ, TCP_NODELAY="1")
AE = "SHARDPACS"


def start_harness(tmp_path, *extra):
    log = open(tmp_path / "harness.log", "w")
    proc = subprocess.Popen([str(HARNESS), "--ae", AE, *map(str, extra)], env=ENV,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    port = int(proc.stdout.readline())
    return proc, port, log


def stop_harness(proc, log, tmp_path):
    assert proc.poll() is None, "the harness died: " + (tmp_path / "harness.log").read_text()
    proc.terminate()
    rc = proc.wait(timeout=30)
    log.close()
    assert rc == 0, (tmp_path / "harness.log").read_text()[-4000:]


@pytest.fixture
def harness(tmp_path):
    proc, port, log = start_harness(tmp_path)
    yield port
    stop_harness(proc, log, tmp_path)


def image(pixels=128, **attrs):
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "HI1"
    ds.PatientName = "Hostile^Input"
    ds.Modality = "CT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    if pixels:
        # a 512-column image of as many rows as the pixel bytes make
        ds.Columns = 512 if pixels >= 1024 else pixels // 2
        ds.Rows = pixels // (2 * ds.Columns)
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(pixels)
    return ds


def nest(depth):
    """(0040,A730) sequences nested depth deep, undefined lengths, implicit VR:
    about 16 bytes a level, so 6,000 levels are under 100 KB."""
    sq = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    leaf = struct.pack("<HHI", 0x0040, 0xA160, 4) + b"deep"
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + leaf + close * depth


def assert_alive(port):
    p = subprocess.run(["echoscu", "-aec", AE, "127.0.0.1", str(port)], env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("depth", [6000, 100000])
def test_deeply_nested_store_is_refused(harness, depth):
    ds = image(pixels=0)  # no Pixel Data: the nest is the last element, in tag order
    raw = spcluster.encode_dataset(ds) + nest(depth)
    status, comment = spcluster.raw_store(harness, CTImageStorage, ds.SOPInstanceUID, raw, ae=AE)
    assert status == 0xC000, (hex(status) if status is not None else None, comment)
    assert "nesting depth" in comment, comment
    assert_alive(harness)


def test_nesting_within_the_limit_is_stored(harness):
    ds = image(pixels=0)
    raw = spcluster.encode_dataset(ds) + nest(40)
    status, comment = spcluster.raw_store(harness, CTImageStorage, ds.SOPInstanceUID, raw, ae=AE)
    assert status == 0x0000, (hex(status), comment)


@pytest.mark.parametrize("depth", [10000, 100000])
def test_deeply_nested_find_identifier_is_refused(harness, depth):
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    raw = spcluster.encode_dataset(q) + nest(depth)
    status, comment = spcluster.raw_find(harness, raw, ae=AE)
    assert status == 0xA900, (hex(status) if status is not None else None, comment)
    assert "nesting depth" in comment, comment
    assert_alive(harness)


def test_truncated_data_set_is_refused(harness):
    ds = image(pixels=4096)
    raw = spcluster.encode_dataset(ds)
    status, comment = spcluster.raw_store(harness, CTImageStorage, ds.SOPInstanceUID,
                                          raw[:-1000], ae=AE)
    assert status == 0xC000, (hex(status), comment)


def test_object_over_the_size_limit_is_refused_and_the_association_lives_on(tmp_path):
    proc, port, log = start_harness(tmp_path, "--max-object-size", 1 << 20)
    try:
        big = image(pixels=2 << 20)
        status, comment = spcluster.raw_store(port, CTImageStorage, big.SOPInstanceUID,
                                              spcluster.encode_dataset(big), ae=AE)
        assert status == 0xC000, (hex(status), comment)
        assert "over 1048576 bytes" in comment, comment
        small = image(pixels=64 << 10)
        status, comment = spcluster.raw_store(port, CTImageStorage, small.SOPInstanceUID,
                                              spcluster.encode_dataset(small), ae=AE)
        assert status == 0x0000, (hex(status), comment)
    finally:
        stop_harness(proc, log, tmp_path)


def test_malformed_uids_are_permanent_failures(harness):
    for bad in ("1.2.abc", "1..2", "1.2." + "3" * 70):
        ds = image(StudyInstanceUID=bad)
        status, comment = spcluster.raw_store(harness, CTImageStorage, ds.SOPInstanceUID,
                                              spcluster.encode_dataset(ds), ae=AE)
        assert status == 0xC000, (bad, hex(status), comment)
        assert "StudyInstanceUID" in comment and "not a valid UID" in comment, comment


def test_receive_memory_is_bounded_and_a_store_without_it_retries_later(tmp_path):
    """Two stores stall 64 KB before their end, holding the 1.9 MiB their
    Pixel Data declares each, out of 4.5 MiB of receive memory; a third
    cannot get the 1 MiB it needs within the 1 s wait and answers 0xA700
    (retry later); once the two finish (both stored), memory is back and
    the same third store succeeds."""
    proc, port, log = start_harness(tmp_path, "--max-object-size", 2 << 20,
                                    "--receive-memory", 4608 << 10, "--receive-wait", 1)
    try:
        release = threading.Event()
        reached = [threading.Event(), threading.Event()]
        results = [None, None]

        def stalled(i):
            ds = image(pixels=(1900 << 10))
            raw = spcluster.encode_dataset(ds)
            cut = len(raw) - (64 << 10)

            def pace(offset):
                if offset >= cut and not release.is_set():
                    reached[i].set()
                    release.wait(60)
            results[i] = spcluster.raw_store(port, CTImageStorage, ds.SOPInstanceUID, raw, ae=AE,
                                             timeout=90, before_pdv=pace)

        threads = [threading.Thread(target=stalled, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for r in reached:
            assert r.wait(30), "a stalled store never got near its end"
        time.sleep(0.3)  # the router has read what was sent
        third = image(pixels=1 << 20)
        raw = spcluster.encode_dataset(third)
        status, comment = spcluster.raw_store(port, CTImageStorage, third.SOPInstanceUID, raw,
                                              ae=AE)
        assert status == 0xA700, (hex(status), comment)
        assert "receive memory" in comment, comment
        release.set()
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == [0, 0], results
        status, comment = spcluster.raw_store(port, CTImageStorage, third.SOPInstanceUID, raw,
                                              ae=AE)
        assert status == 0x0000, (hex(status), comment)
    finally:
        release.set()
        stop_harness(proc, log, tmp_path)


def encapsulated_image(fragments, fragment_size):
    """Explicit VR LE data set bytes of an image whose Pixel Data is
    encapsulated (undefined length: its size is unknown until its end)."""
    ds = image(pixels=0)
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    raw = spcluster.encode_dataset(ds, implicit=False)
    px = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    px += struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # empty offset table
    for i in range(fragments):
        px += struct.pack("<HHI", 0xFFFE, 0xE000, fragment_size) + bytes([i % 251]) * fragment_size
    px += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return ds, raw + px


def test_receives_of_unknown_size_never_wait_on_each_other_for_ever(tmp_path):
    """Encapsulated Pixel Data declares no size, so these receives grow step
    by step: four at once can hold the whole budget between them, each
    waiting for more. The one that finds nothing can come free gives up
    (0xA700, its memory freed) instead of waiting out receive_wait (set far
    beyond this test's time); the others complete."""
    proc, port, log = start_harness(tmp_path, "--max-object-size", 4 << 20,
                                    "--receive-memory", 8 << 20, "--receive-wait", 600)
    try:
        results = [None] * 4
        # All four pause at 2 MiB (past the 1 MiB the gate reads ahead) or
        # after 3 s, so that they hold memory at the same time, then grow on.
        barrier = threading.Barrier(4)

        def store(i):
            ds, raw = encapsulated_image(192, 16 << 10)  # 3 MiB
            paused = []

            def pace(offset):
                if offset >= 2 << 20 and not paused:
                    paused.append(True)
                    try:
                        barrier.wait(3)
                    except threading.BrokenBarrierError:
                        pass
            results[i] = spcluster.raw_store(port, CTImageStorage, ds.SOPInstanceUID, raw, ae=AE,
                                             transfer_syntax="1.2.840.10008.1.2.4.50",
                                             timeout=120, before_pdv=pace)

        threads = [threading.Thread(target=store, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert all(r is not None for r in results), results
        statuses = sorted(r[0] for r in results)
        assert set(statuses) <= {0x0000, 0xA700}, results
        assert statuses[0] == 0x0000, results
        # those that gave up did so because nothing could come free, not
        # after receive_wait
        assert all("held by other receives" in c for st, c in results if st == 0xA700), results
        ds, raw = encapsulated_image(8, 16 << 10)
        status, comment = spcluster.raw_store(port, CTImageStorage, ds.SOPInstanceUID, raw,
                                              ae=AE, transfer_syntax="1.2.840.10008.1.2.4.50")
        assert status == 0x0000, (hex(status), comment)
    finally:
        stop_harness(proc, log, tmp_path)
