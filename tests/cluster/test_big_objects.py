"""Large objects through a real router: 16 concurrent C-STOREs of 256 MiB
each keep the router's peak memory under its [dicom] receive_memory plus a
fixed margin (receives wait for memory instead of piling up; the object is
received once and sent to the replicas without copies), and every store is
acknowledged only once stored (a large object's deadline grows with its
size); a store that finds no memory in time is told to retry later and
does. The nodes' peak memory is printed for the README's figures.

Run: SP_BUILD_DIR=build /usr/bin/python3 -m pytest -q -s tests/cluster/test_big_objects.py
"""
import hashlib
import os
import shutil
import subprocess
import time

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import spcluster

STORES = int(os.environ.get("SP_BIG_STORES", "16"))
ROWS, COLUMNS = 8192, 16384  # 16-bit pixels: 256 MiB of Pixel Data
RECEIVE_MEMORY = 1 << 30
# What the router may hold beyond its receive buffers: its code, DCMTK's
# PDU buffers (one per association), ZeroMQ's and CURVE's per-connection
# buffers, the query and gossip state.
MARGIN = 256 << 20


def peak_rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def make_files(d, study):
    """STORES files that differ only in their SOP Instance UID (same length,
    patched in place), so generating them costs one write each."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    # the last three digits number the files (000 for this first one)
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.77.")[:-3] + "000"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BIG1"
    ds.PatientName = "Big^Objects"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (ROWS * COLUMNS * 2 // 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.is_little_endian, ds.is_implicit_VR = True, False
    first = d / "big0.dcm"
    ds.save_as(str(first), write_like_original=False)
    uid = ds.SOPInstanceUID.encode()
    files, uids = [first], [ds.SOPInstanceUID]
    for i in range(1, STORES):
        new = (uid[:-3] + b"%03d" % i)
        path = d / f"big{i}.dcm"
        shutil.copyfile(first, path)
        with open(path, "r+b") as f:
            head = f.read(4096)
            assert head.count(uid) == 2
            f.seek(0)
            f.write(head.replace(uid, new))
        files.append(path)
        uids.append(new.decode())
    return files, uids


def store_all(port, files, rounds=6):
    """Stores every file with one storescu each, all at once. A store that
    finds no receive memory within receive_wait is told to retry later
    (0xA700), as a modality would be, and sends again; any other failure
    fails the test. Returns how many sends were retried."""
    env = dict(os.environ, TCP_NODELAY="1")
    pending, retries = list(files), 0
    for _ in range(rounds):
        if not pending:
            break
        procs = [subprocess.Popen(["storescu", "-d", "-aec", "SHARDPACS", "127.0.0.1", str(port),
                                   str(f)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for f in pending]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        statuses = [spcluster.dimse_statuses(o) for o in outs]
        bad = [o for o, st in zip(outs, statuses) if st not in ([0], [0xA700])]
        assert not bad, (statuses, bad[0][-1500:])
        pending = [f for f, st in zip(pending, statuses) if st == [0xA700]]
        retries += len(pending)
    assert not pending, f"{len(pending)} stores still refused after {rounds} rounds"
    return retries


def test_concurrent_large_stores_keep_the_router_within_its_receive_memory(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    study = generate_uid()
    files, uids = make_files(d, study)
    # receive_wait stays under the 60 s after which DCMTK's storescu gives up
    # a send that does not move: a store without memory by then is answered
    # 0xA700 instead of being cut off.
    router_extra = {"dicom": {"receive_memory": str(RECEIVE_MEMORY), "receive_wait": "40s",
                              "max_object_size": "512M",
                              "workers": "32", "dimse_timeout": "5m"},
                    "cluster": {"store_timeout": "60s", "fetch_timeout": "5m"}}
    with spcluster.cluster(tmp_path, nodes=1, replicas=1, quorum=1,
                           router_extra=router_extra) as c:
        r = c.routers[0]
        start = time.monotonic()
        retries = store_all(r.port, files)
        took = time.monotonic() - start
        router_peak = peak_rss(r.proc.pid)
        node_peak = peak_rss(c.nodes[0].proc.pid)
        gib = STORES * ROWS * COLUMNS * 2 / (1 << 30)
        print(f"\n{STORES} x 256 MiB stored in {took:.1f} s ({gib * 1024 / took:.0f} MiB/s, "
              f"{retries} retried after 0xA700); router peak {router_peak >> 20} MiB "
              f"(receive_memory {RECEIVE_MEMORY >> 20} MiB), node peak {node_peak >> 20} MiB")
        assert router_peak < RECEIVE_MEMORY + MARGIN, router_peak
        # every instance is there, and one comes back whole
        out = tmp_path / "f"
        out.mkdir()
        found = spcluster.dcmtk(["findscu", "-S", "-aec", "SHARDPACS", "-X", "-od", str(out),
                                 "-k", "QueryRetrieveLevel=IMAGE", "-k",
                                 f"StudyInstanceUID={study}", "-k", "SOPInstanceUID",
                                 "127.0.0.1", str(r.port)])
        assert found.returncode == 0
        assert sorted(pydicom.dcmread(str(p)).SOPInstanceUID for p in out.iterdir()) == \
            sorted(uids)
        got = tmp_path / "g"
        got.mkdir()
        spcluster.dcmtk(["getscu", "-aec", "SHARDPACS", "-od", str(got), "-k",
                         "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}", "-k",
                         f"SOPInstanceUID={uids[5]}", "127.0.0.1", str(r.port)], timeout=600)
        (back,) = list(got.iterdir())
        want = hashlib.sha256(pydicom.dcmread(str(files[5])).PixelData).hexdigest()
        assert hashlib.sha256(pydicom.dcmread(str(back)).PixelData).hexdigest() == want
