"""Process-level tests of cluster membership between real shardpacs-node
processes: convergence from one seed, failure detection of a kill -9'd node
(suspect, then down, then out only after the configured delay), its return
with a higher incarnation, and refusal of a gossip message whose sender name
is not the CURVE-authenticated caller's. Gossip timings are short: probe
200 ms, suspicion about 1 s, out 3 s after down. The view is read from the
node logs ("member n2 alive -> suspect (incarnation N)")."""
import re
import struct
import time

import pytest
import zmq

from spcluster import Node, keygen, wait_until as wait_for

GOSSIP = ("[gossip]\nprobe_interval = 200ms\nprobe_timeout = 100ms\nsuspicion_mult = 3\n"
          "suspicion_max_mult = 2\nsync_interval = 1s\ndown_to_out = 3s\n")
OUT_DELAY_S = 3.0
LINE = re.compile(r"member (\S+) (\S+) -> (\S+) \(incarnation (\d+)")


def transitions(node, since=0):
    """[(member, old, new, incarnation)] from the node's log, from byte offset since."""
    text = node.log.read_text(errors="replace")[since:]
    return [(m, a, b, int(i)) for m, a, b, i in LINE.findall(text)]


def view(node):
    """{member: last logged state}."""
    return {m: b for m, _, b, _ in transitions(node)}


@pytest.fixture
def three(tmp_path):
    keys = tmp_path / "cluster.keys"
    keys.write_text("")
    nodes = [Node(tmp_path, f"n{i}", keys, extra=GOSSIP) for i in (1, 2, 3)]
    keys.write_text("".join(f"{n.public} {n.name}\n" for n in nodes))
    nodes[0].start()
    for n in nodes[1:]:
        with open(n.config, "a") as f:
            f.write(f"[cluster]\nseeds = n1@{nodes[0].endpoint}\n")
        n.start()
    yield nodes
    for n in nodes:
        n.stop()


def test_converge_detect_failure_and_return(three):
    n1, n2, n3 = three
    names = {n.name for n in three}

    def converged():
        return all(all(view(n).get(o) == "alive" for o in names - {n.name}) for n in three)
    wait_for(converged, 10, "three nodes to see each other alive")
    first_inc = max(i for m, a, b, i in transitions(n1) if m == "n3")

    offsets = {n.name: len(n.log.read_text(errors="replace")) for n in (n1, n2)}
    n3.kill9()
    seen = {}  # (observer, state) -> monotonic time first observed

    def all_out():
        for n in (n1, n2):
            for m, _, b, _ in transitions(n, offsets[n.name]):
                if m == "n3":
                    seen.setdefault((n.name, b), time.monotonic())
        return all((o, "out") in seen for o in ("n1", "n2"))
    wait_for(all_out, 15, "n1 and n2 to mark n3 out")
    for n in (n1, n2):
        states = [b for m, _, b, _ in transitions(n, offsets[n.name]) if m == "n3"]
        # suspect first, then down, then out (down may be reached via a peer's update)
        assert states[0] == "suspect", (n.name, states)
        assert "down" in states and states.index("down") < states.index("out"), (n.name, states)
        assert "alive" not in states, (n.name, states)
        assert seen[(n.name, "out")] - seen[(n.name, "down")] >= OUT_DELAY_S - 0.5, seen
        # the survivors still see each other alive
        other = "n2" if n is n1 else "n1"
        assert view(n)[other] == "alive"

    n3.start()  # a new process, possibly on another port
    wait_for(lambda: view(n1).get("n3") == "alive" and view(n2).get("n3") == "alive"
             and view(n3).get("n1") == "alive" and view(n3).get("n2") == "alive",
             10, "n3 to come back alive everywhere")
    for n in (n1, n2):
        back = [i for m, a, b, i in transitions(n, offsets[n.name]) if m == "n3" and b == "alive"]
        assert back and back[-1] > first_inc, (n.name, back, first_inc)
    for n in three:
        assert n.alive()


# ---- spoofed sender -------------------------------------------------------

def _varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num, value):
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _parse(buf):
    """Top-level protobuf fields as {num: value} (varints as ints, else bytes)."""
    fields, i = {}, 0
    while i < len(buf):
        key, shift = 0, 0
        while True:
            b = buf[i]; i += 1
            key |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                break
        num, wt = key >> 3, key & 7
        val, shift = 0, 0
        while True:
            b = buf[i]; i += 1
            val |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                break
        if wt == 2:
            val, i = buf[i:i + val], i + val
        else:
            assert wt == 0, wt
        fields[num] = val
    return fields


def _ping(from_id, node, seq):
    msg = (_field(1, 1) + _field(2, from_id) + _field(3, "tcp://127.0.0.1:9") +
           _field(4, node.name) + _field(5, node.endpoint) + _field(6, seq))
    return _field(8, msg)  # Request.gossip


def _call(sock, head, rid):
    sock.send_multipart([b"SPK1" + bytes([1, 0, 0, 0]) + struct.pack("<QI", rid, 3000), head])
    assert sock.poll(5000), "no reply"
    frames = sock.recv_multipart()
    assert struct.unpack("<Q", frames[0][8:16])[0] == rid
    assert struct.unpack("<i", frames[0][16:20])[0] == 0
    return _parse(frames[1])


def test_gossip_with_another_members_name_is_refused(tmp_path):
    keys = tmp_path / "cluster.keys"
    keys.write_text("")
    node = Node(tmp_path, "n1", keys, extra=GOSSIP)
    admin_key, victim_key = tmp_path / "admin.key", tmp_path / "n2.key"
    admin_pub, victim_pub = keygen(admin_key), keygen(victim_key)
    # The caller's key has no role word and a name not beginning "admin":
    # a member's rights, gossip included (an operator's key may not gossip).
    keys.write_text(f"{node.public} n1\n{admin_pub} probe\n{victim_pub} n2\n")
    node.start()
    ctx = zmq.Context()
    try:
        kv = dict(l.split("=", 1) for l in admin_key.read_text().splitlines() if "=" in l)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_publickey = kv["public-key "].strip().encode()
        sock.curve_secretkey = kv["secret-key "].strip().encode()
        sock.curve_serverkey = node.public.encode()
        sock.connect(node.endpoint)
        # Control: under its own name the caller gets the ACK to its PING.
        ok = _call(sock, _ping("probe", node, 7), 1)
        assert ok.get(1, 0) == 0, ok
        ack = _parse(_parse(ok[10])[1])  # Reply.gossip.message
        assert ack[1] == 2 and ack[6] == 7 and ack[2] == b"n1", ack  # ACK, seq 7, from n1
        # Spoofed: the same key claims to be n2.
        bad = _call(sock, _ping("n2", node, 8), 2)
        assert bad.get(1, 0) != 0, bad  # sint32 status, non-zero
        assert 10 not in bad, bad
        sock.close()
        time.sleep(0.3)
        log = node.log.read_text()
        assert "refused gossip" in log and "'n2'" in log
        assert "member n2 " not in log  # nothing learned from the forged message
        assert node.alive()
    finally:
        ctx.destroy(linger=0)  # closes the socket too when an assertion failed
        node.stop()
