"""Process-level tests of one real shardpacs-node: CURVE admission, bit-exact
put/get through the real transport, refusal of unlisted and plaintext
clients, malformed messages, durability across kill -9, and start-up checks
on configuration and key files."""
import os
import struct
import subprocess
import time

import pytest
import zmq

from spcluster import NODE_BIN, Node, keygen

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = STUDY + ".1"


@pytest.fixture
def cluster(tmp_path):
    """A node and an admin client key, both listed in the cluster keys."""
    keys = tmp_path / "cluster.keys"
    admin_key = tmp_path / "admin.key"
    admin_pub = keygen(admin_key)
    keys.write_text("")
    node = Node(tmp_path, "n1", keys)
    keys.write_text(f"{node.public} n1\n{admin_pub} admin\n")
    node.start()
    yield node, admin_key, tmp_path
    node.stop()


def put(node, key, sop, data_path, **kw):
    return node.cli(key, "put", "--study", STUDY, "--series", SERIES, "--sop", sop,
                    "--partition", "7", data_path, **kw)


def test_listed_client_stores_and_reads_back_bit_exact(cluster):
    node, key, tmp = cluster
    for i, size in enumerate([1, 12_000, 3 * 1024 * 1024 + 17]):  # 3 MiB spans several chunks
        src = tmp / f"obj{i}.dcm"
        src.write_bytes(os.urandom(size))
        sop = f"{SERIES}.{i + 1}"
        assert put(node, key, sop, src).stdout.strip() == b"stored"
        out = tmp / f"back{i}.dcm"
        node.cli(key, "get", sop, out)
        assert out.read_bytes() == src.read_bytes()
    listed = node.cli(key, "list", STUDY).stdout.decode().splitlines()
    assert len(listed) == 3
    stats = node.cli(key, "stats").stdout.decode()
    assert '"instances": 3' in stats


def test_duplicate_is_idempotent_and_conflict_is_reported(cluster):
    node, key, tmp = cluster
    a, b = tmp / "a.dcm", tmp / "b.dcm"
    a.write_bytes(b"A" * 5000)
    b.write_bytes(b"B" * 5000)
    sop = SERIES + ".9"
    assert put(node, key, sop, a).stdout.strip() == b"stored"
    assert put(node, key, sop, a).stdout.strip() == b"duplicate"
    res = put(node, key, sop, b, check=False)
    assert res.returncode != 0 and res.stdout.strip() == b"conflict"
    out = tmp / "out.dcm"
    node.cli(key, "get", sop, out)
    assert out.read_bytes() == a.read_bytes()  # never silently overwritten
    assert '"conflicts": 1' in node.cli(key, "stats").stdout.decode()


def test_unlisted_key_is_refused(cluster):
    node, _, tmp = cluster
    stranger = tmp / "stranger.key"
    keygen(stranger)
    res = node.cli(stranger, "stats", check=False, timeout=60,
                   env={"SHARDPACS_TIMEOUT_MS": "3000"})
    assert res.returncode != 0
    assert b"unavailable" in res.stderr or b"deadline" in res.stderr
    time.sleep(0.2)
    assert "refused" in node.log.read_text().lower()


def _raw_request(sock, head: bytes, rid=1, timeout_ms=2000):
    frame0 = b"SPK1" + bytes([1, 0, 0, 0]) + struct.pack("<QI", rid, timeout_ms)
    sock.send_multipart([b"", frame0, head]) if sock.type == zmq.REQ else \
        sock.send_multipart([frame0, head])


def test_plaintext_client_is_refused(cluster):
    node, _, _ = cluster
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(node.endpoint)
    _raw_request(sock, b"\x3a\x00")  # a well-formed stats request
    assert sock.poll(2000) == 0, "a client without CURVE got an answer"
    sock.close()
    ctx.term()
    # The node still serves listed clients afterwards.
    node.cli(cluster[1], "stats")


def _curve_socket(ctx, node, key_path):
    pub = sec = None
    for line in key_path.read_text().splitlines():
        if line.startswith("public-key"):
            pub = line.split("=", 1)[1].strip()
        if line.startswith("secret-key"):
            sec = line.split("=", 1)[1].strip()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey = pub.encode()
    sock.curve_secretkey = sec.encode()
    sock.curve_serverkey = node.public.encode()
    sock.connect(node.endpoint)
    return sock


def test_malformed_messages_get_errors_and_node_survives(cluster):
    node, key, _ = cluster
    ctx = zmq.Context()
    sock = _curve_socket(ctx, node, key)
    bad_heads = [b"\xff\xff\xff", os.urandom(300), b"", b"\x0a\x02\x08"]
    for i, head in enumerate(bad_heads):
        _raw_request(sock, head, rid=100 + i)
        assert sock.poll(5000), f"no reply to malformed request {i}"
        frames = sock.recv_multipart()
        assert frames[0][:4] == b"SPK1"
        rid, = struct.unpack("<Q", frames[0][8:16])
        assert rid == 100 + i
        status, = struct.unpack("<i", frames[0][16:20])
        # Either the transport refused it (status != 0) or the node answered
        # with an error Reply (field 1, a non-zero sint32 status).
        assert status != 0 or (len(frames) > 1 and frames[1][:1] == b"\x08"
                               and frames[1][1:2] != b"\x00")
    # A bad frame 0 (wrong magic) must not kill the node either.
    sock.send_multipart([b"JUNK" * 5, b"x"])
    sock.poll(1000)
    sock.close()
    ctx.term()
    node.cli(key, "stats")
    assert node.proc.poll() is None


def test_acknowledged_put_survives_kill_9(cluster):
    node, key, tmp = cluster
    payloads = {}
    for i in range(20):
        src = tmp / f"k{i}.dcm"
        src.write_bytes(os.urandom(200_000 if i % 2 else 9_000))
        sop = f"{SERIES}.{100 + i}"
        put(node, key, sop, src)
        payloads[sop] = src.read_bytes()
    node.kill9()  # immediately after the last acknowledgement
    node.start()
    for sop, data in payloads.items():
        out = tmp / "r.dcm"
        node.cli(key, "get", sop, out)
        assert out.read_bytes() == data
    assert '"instances": 20' in node.cli(key, "stats").stdout.decode()


def test_bad_config_is_a_clear_error(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[node]\nid = n1\nlisten_port = 5\n")
    res = subprocess.run([str(NODE_BIN), "--config", str(conf)], capture_output=True, timeout=30)
    assert res.returncode != 0
    assert f"{conf}:3: unknown key 'listen_port'".encode() in res.stderr
    conf.write_text("[transport]\nworkers = lots\n")
    res = subprocess.run([str(NODE_BIN), "--config", str(conf)], capture_output=True, timeout=30)
    assert res.returncode != 0 and b"workers" in res.stderr and b":2:" in res.stderr


def test_world_readable_secret_key_is_refused(tmp_path):
    keys = tmp_path / "cluster.keys"
    keys.write_text("")
    node = Node(tmp_path, "n1", keys)
    keys.write_text(f"{node.public} n1\n")
    os.chmod(node.key, 0o644)
    with pytest.raises(AssertionError, match="exited"):
        node.start(timeout=10)
    assert "node.key" in node.log.read_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs to fill up (needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace')}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_clearly_and_keeps_what_was_acknowledged(small_disk):
    keys = small_disk / "cluster.keys"
    admin_key = small_disk / "admin.key"
    admin_pub = keygen(admin_key)
    keys.write_text("")
    # reserve = 0: this test is about RocksDB meeting a really full disk,
    # not the reserve that would refuse puts long before (test_admin.py).
    node = Node(small_disk, "n1", keys, extra="[store]\nwrite_buffer = 4M\nreserve = 0\n")
    keys.write_text(f"{node.public} n1\n{admin_pub} admin\n")
    node.start()
    try:
        obj = small_disk.parent / "obj.dcm"  # outside the small file system
        stored, refused = {}, 0
        for i in range(40):
            obj.write_bytes(os.urandom(600_000))
            sop = f"{SERIES}.{500 + i}"
            # A node meeting ENOSPC mid-flush can take longer than the
            # CLI's default 10 s to answer on a loaded machine: wait for the
            # answer itself, which must name the full disk.
            res = put(node, admin_key, sop, obj, check=False,
                      env={"SHARDPACS_TIMEOUT_MS": "60000"}, timeout=180)
            if res.returncode == 0:
                assert refused == 0, "a put succeeded after the disk was full"
                stored[sop] = obj.read_bytes()
            else:
                refused += 1
                alive = node.proc.poll() is None
                assert b"no space left on device" in res.stderr, (
                    res.stderr, "node alive" if alive else f"node exited {node.proc.returncode}")
        assert stored and refused, (len(stored), refused)
        assert "No space left on device" in node.log.read_text()
        # Everything acknowledged is intact, before and after a restart.
        for restart in (False, True):
            if restart:
                node.stop()
                node.start()
            for sop, data in stored.items():
                back = small_disk.parent / "back.dcm"
                node.cli(admin_key, "get", sop, back)
                assert back.read_bytes() == data
            assert f'"instances": {len(stored)}' in node.cli(admin_key, "stats").stdout.decode()
    finally:
        node.stop()
