"""DICOM TLS on the front door (router/tls.c, router/gate.c,
router/dicom_server.cc), driven with DCMTK's own TLS clients (storescu,
findscu, echoscu with `+tls KEY CERT +cf CA`, and storescp +tls as a C-MOVE
destination) against tests/tools/dicom_harness and a real cluster.

DCMTK 3.6.7's movescu and getscu have no TLS options: they reach the TLS
port through `TlsProxy`, a small forwarder in this file that opens a TLS
connection (Python's ssl, i.e. OpenSSL, with the client certificate) per
accepted plain connection.

Certificates come from tlscerts.py (a CA, the router's, clients', one from
another CA, one expired). Bit-exactness is checked as in
test_dicom_adapter.py: against what a bit-preserving storescp received from
the same storescu input.

Run: SP_BUILD_DIR=build /usr/bin/python3 -m pytest -q -s tests/cluster/test_tls.py
"""
import os
import re
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

import dataset
import spcluster
import tlscerts
from test_front_door import assoc_rq, recv_pdu

HARNESS = spcluster.BUILD / "dicom_harness"
ENV = dict(os.environ, TCP_NODELAY="1")
AE = "SHARDPACS"
BOUND = 10.0  # seconds for one tool run: generous; times are printed


# ---- certificates, tools, harness ---------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ca = tlscerts.make_ca(d / "ca")
    other_ca = tlscerts.make_ca(d / "other-ca", "another CA")
    return {
        "dir": d,
        "ca": ca,
        "other_ca": other_ca,
        "server": tlscerts.make_cert(ca, d / "server", "router", server=True),
        "client": tlscerts.make_cert(ca, d / "client", "modality1"),
        "foreign": tlscerts.make_cert(other_ca, d / "foreign", "intruder"),
        "expired": tlscerts.make_cert(ca, d / "expired", "old-modality", expired=True),
        "other_server": tlscerts.make_cert(other_ca, d / "other-server", "router2", server=True),
        "other_client": tlscerts.make_cert(other_ca, d / "other-client", "modality2"),
    }


def tls_args(client, ca):
    """DCMTK client options for an authenticated TLS connection."""
    if client is None:
        return ["+tla", "+cf", str(ca.cert)]  # TLS without a certificate
    return ["+tls", str(client.key), str(client.cert), "+cf", str(ca.cert)]


def run(args, timeout=BOUND, check=True):
    p = subprocess.run([str(a) for a in args], env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def echo(port, client, ca, check=True):
    return run(["echoscu", "-aec", AE, *tls_args(client, ca), "127.0.0.1", port], check=check)


class Harness:
    """dicom_harness serving plain and TLS (ports from its stdout)."""

    def __init__(self, tmp, certs, *extra, cert=None, ca=None):
        self.log_path = tmp / f"harness-{time.monotonic_ns()}.log"
        cert = cert or certs["server"]
        ca = ca or certs["ca"]
        self.proc = subprocess.Popen(
            [str(HARNESS), "--ae", AE, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
             "--tls-ca", str(ca.cert), *map(str, extra)],
            env=ENV, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True)
        self.port = int(self.proc.stdout.readline())
        self.tls_port = int(self.proc.stdout.readline())

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        assert self.proc.poll() is None, "the harness died:\n" + self.log()[-3000:]
        self.proc.terminate()
        assert self.proc.wait(timeout=30) == 0, self.log()[-3000:]


class TlsScp(spcluster.Scp):
    """A bit-preserving storescp on DICOM TLS, requiring a client certificate
    from ca (the C-MOVE destination)."""

    def __init__(self, directory, aet, server, ca):
        super().__init__(directory, aet, True,
                         ["+tls", str(server.key), str(server.cert), "+cf", str(ca.cert)])


class TlsProxy:
    """Forwards plain TCP connections on self.port to a TLS port, each over
    its own TLS connection with the client certificate (for movescu and
    getscu, which have no TLS options in DCMTK 3.6.7)."""

    def __init__(self, target_port, client, ca):
        self.ctx = ssl.create_default_context(cafile=str(ca.cert))
        self.ctx.check_hostname = False
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(str(client.cert), str(client.key))
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(c,), daemon=True).start()

    def _pipe(self, c):
        try:
            raw = socket.create_connection(("127.0.0.1", self.target))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = self.ctx.wrap_socket(raw)
        except OSError:
            c.close()
            return
        try:
            while True:
                if t.pending():  # decrypted bytes select() cannot see
                    ready = [t]
                else:
                    ready, _, _ = select.select([c, t], [], [], 60)
                if not ready:
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (t if s is c else c).sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()
            t.close()

    def stop(self):
        self.stopping = True
        self.lsock.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bulk")
    bulk = dataset.make_bulk_set(d, small=6, ct=2, studies=2, seed=7)
    return {"dir": d, "paths": list(bulk.small_paths) + list(bulk.ct_paths),
            "studies": bulk.study_uids}


def reference(tmp, images):
    """What a bit-preserving storescp receives from storescu for the images."""
    ref = spcluster.Scp(tmp / "ref", "REF")
    try:
        run(["storescu", "-aec", "REF", "127.0.0.1", ref.port, *images["paths"]], timeout=60)
        return {uid: dataset.dataset_bytes_after_meta(p) for uid, p in ref.files().items()}
    finally:
        ref.stop()


def check_bit_exact(files, want):
    got = {uid: dataset.dataset_bytes_after_meta(p) for uid, p in files.items()}
    assert set(got) == set(want), f"{len(got)} instances, wanted {len(want)}"
    for uid in want:
        assert got[uid] == want[uid], f"{uid}: retrieved bytes differ from the stored ones"


# ---- round trips through the adapter -------------------------------------------

def round_trip(tmp, certs, images, tls_port, dest, want):
    """storescu, findscu, getscu and movescu over TLS; every retrieved object
    bit-exact."""
    cli, ca = certs["client"], certs["ca"]
    t = time.monotonic()
    run(["storescu", "-aec", AE, *tls_args(cli, ca), "127.0.0.1", tls_port, *images["paths"]],
        timeout=60)
    print(f"\nstorescu +tls of {len(images['paths'])} images: "
          f"{(time.monotonic() - t) * 1000:.0f} ms")
    p = run(["findscu", "-S", "-aec", AE, *tls_args(cli, ca), "-k", "QueryRetrieveLevel=STUDY",
             "-k", "StudyInstanceUID", "127.0.0.1", tls_port])
    found = [s for s in images["studies"] if s in p.stdout + p.stderr]
    assert found == images["studies"], p.stdout + p.stderr
    uids = "\\".join(images["studies"])
    proxy = TlsProxy(tls_port, cli, ca)
    try:
        got = tmp / "got"
        got.mkdir()
        run(["getscu", "-S", "-aec", AE, "-k", "QueryRetrieveLevel=STUDY", "-k",
             f"StudyInstanceUID={uids}", "-od", got, "127.0.0.1", proxy.port], timeout=60)
        check_bit_exact({pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: f
                         for f in got.iterdir()}, want)
        run(["movescu", "-S", "-aec", AE, "-aem", "TLSDEST", "-k",
                 "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uids}", "127.0.0.1",
                 proxy.port], timeout=60)
        check_bit_exact(dest.files(), want)
    finally:
        proxy.stop()


def test_harness_round_trip_and_certificate_subject(tmp_path, certs, images):
    want = reference(tmp_path, images)
    dest = TlsScp(tmp_path / "dest", "TLSDEST", certs["server"], certs["ca"])
    h = Harness(tmp_path, certs, "--tls-dest", f"TLSDEST=127.0.0.1:{dest.port}")
    try:
        round_trip(tmp_path, certs, images, h.tls_port, dest, want)
        # The adapter hands the verified subject to the handlers.
        assert "cert=CN=modality1,O=ShardPACS tests" in h.log()
        # The plain port serves beside the TLS one, without a subject.
        run(["storescu", "-aec", AE, "127.0.0.1", h.port, images["paths"][0]])
        assert "cert=(none)" in h.log()
    finally:
        h.stop()
        dest.stop()


def test_refusals(tmp_path, certs):
    h = Harness(tmp_path, certs)
    try:
        ca = certs["ca"]
        echo(h.tls_port, certs["client"], ca)
        cases = {
            "no client certificate": lambda: echo(h.tls_port, None, ca, check=False),
            "certificate from another CA": lambda: echo(h.tls_port, certs["foreign"], ca,
                                                        check=False),
            "expired certificate": lambda: echo(h.tls_port, certs["expired"], ca, check=False),
            "plain client on the TLS port": lambda: run(["echoscu", "-aec", AE, "127.0.0.1",
                                                         h.tls_port], check=False),
            "TLS client on the plain port": lambda: echo(h.port, certs["client"], ca,
                                                         check=False),
        }
        for what, attempt in cases.items():
            p = attempt()
            assert p.returncode != 0, f"{what} was accepted:\n{p.stdout}{p.stderr}"
        log = h.log()
        assert "peer did not return a certificate" in log
        assert "certificate refused: unable to get local issuer certificate" in log
        assert "certificate refused: certificate has expired" in log
        assert "wrong version number" in log  # an A-ASSOCIATE-RQ is no ClientHello
        # And the server still serves.
        echo(h.tls_port, certs["client"], ca)
    finally:
        h.stop()


def test_verify_peer_off_and_tls_only(tmp_path, certs):
    h = Harness(tmp_path, certs, "--no-verify-peer", "--no-plain")
    try:
        assert h.port == -1  # no plain port at all
        echo(h.tls_port, None, certs["ca"])  # no client certificate needed
        echo(h.tls_port, certs["client"], certs["ca"])
        # The client still verifies the server: another CA's clients refuse it.
        p = echo(h.tls_port, None, certs["other_ca"], check=False)
        assert p.returncode != 0
    finally:
        h.stop()


def test_certificate_reload(tmp_path, certs):
    live = tmp_path / "live"
    live.mkdir()
    cert, key, ca = live / "server.pem", live / "server.key", live / "ca.pem"
    shutil.copy(certs["server"].cert, cert)
    shutil.copy(certs["server"].key, key)
    shutil.copy(certs["ca"].cert, ca)
    files = tlscerts.Cert(cert, key, "router")
    h = Harness(tmp_path, certs, cert=files, ca=tlscerts.Cert(ca, ca, "ca"))
    try:
        echo(h.tls_port, certs["client"], certs["ca"])
        # A broken certificate file keeps the previous context.
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        time.sleep(1.1)
        echo(h.tls_port, certs["client"], certs["ca"])
        assert "does not load, keeping the previous" in h.log()
        # A new certificate, key and CA from another CA: the next connection
        # after the check (at most a second) uses them all.
        shutil.copy(certs["other_server"].key, key)
        shutil.copy(certs["other_server"].cert, cert)
        shutil.copy(certs["other_ca"].cert, ca)
        time.sleep(1.1)
        deadline = time.monotonic() + 5
        while echo(h.tls_port, certs["other_client"], certs["other_ca"],
                   check=False).returncode != 0:
            assert time.monotonic() < deadline, "the new certificate was not taken up:\n" + \
                h.log()[-2000:]
            time.sleep(0.3)
        assert "re-read" in h.log()
        # The old CA's clients are refused now, and do not trust the server.
        assert echo(h.tls_port, certs["client"], certs["ca"], check=False).returncode != 0
        assert echo(h.tls_port, certs["client"], certs["other_ca"],
                    check=False).returncode != 0
    finally:
        h.stop()


# ---- hostile peers over TLS --------------------------------------------------------

def client_hello():
    """The bytes of a real TLS ClientHello (never completed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def connect_many(port, n):
    from test_front_door import connect_many as cm
    return cm(port, n)


def timed_echoes(port, certs, what, count=3):
    times = []
    for _ in range(count):
        t = time.monotonic()
        echo(port, certs["client"], certs["ca"])
        times.append(time.monotonic() - t)
    print(f"\n{what}: echoscu +tls {', '.join(f'{x * 1000:.0f}' for x in times)} ms")


def test_silent_and_trickling_tls_peers_hold_no_worker(tmp_path, certs):
    # Two workers only: a single held worker would show.
    h = Harness(tmp_path, certs, "--workers", "2", "--acse-timeout", "4")
    silent = connect_many(h.tls_port, 100)
    trickling = connect_many(h.tls_port, 100)
    hello = client_hello()
    stop = threading.Event()
    sent = [0]

    def trickle():
        while not stop.wait(0.5) and sent[0] < len(hello):
            for s in trickling:
                try:
                    s.send(hello[sent[0]:sent[0] + 1])
                except OSError:
                    pass
            sent[0] += 1

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(0.6)
        timed_echoes(h.tls_port, certs, "100 silent + 100 trickling ClientHellos")
        # The acse_timeout deadline (4 s from accept) covers the handshake:
        # every one of them is closed by then, trickling or not.
        deadline = time.monotonic() + 8
        for s in silent + trickling:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        assert time.monotonic() < deadline
        assert sent[0] < len(hello)
    finally:
        stop.set()
        t.join(timeout=5)
        for s in silent + trickling:
            s.close()
        h.stop()


def tls_associate(port, certs):
    """A TLS connection with an accepted association, then left idle."""
    ctx = ssl.create_default_context(cafile=str(certs["ca"].cert))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(certs["client"].cert), str(certs["client"].key))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
    s.sendall(assoc_rq())
    kind, _ = recv_pdu(s)
    assert kind == 0x02, f"association not accepted (PDU type {kind})"
    return s


def test_idle_tls_associations_hold_no_worker(tmp_path, certs):
    h = Harness(tmp_path, certs, "--workers", "2", "--dimse-timeout", "3")
    socks = [tls_associate(h.tls_port, certs) for _ in range(20)]
    try:
        timed_echoes(h.tls_port, certs, "20 idle TLS associations (2 workers)")
        # Idle past dimse_timeout: aborted (A-ABORT, then closed).
        for s in socks:
            s.settimeout(8)
            kind, _ = recv_pdu(s, timeout=8)
            assert kind == 0x07
    finally:
        for s in socks:
            s.close()
        h.stop()


def test_tls_message_split_across_records(tmp_path, certs, images):
    """A C-ECHO whose PDU arrives in several TLS records with pauses, and a
    next request already inside OpenSSL's buffer when the worker parks."""
    h = Harness(tmp_path, certs, "--workers", "1")
    try:
        s = tls_associate(h.tls_port, certs)
        c = pydicom.dataset.Dataset()
        c.AffectedSOPClassUID = "1.2.840.10008.1.1"
        c.CommandField = 0x0030
        c.MessageID = 1
        c.CommandDataSetType = 0x0101
        enc = spcluster.encode_dataset(c)
        cmd = struct.pack("<HHII", 0, 0, 4, len(enc)) + enc
        pdv = struct.pack(">IBB", len(cmd) + 2, 1, 0x03) + cmd
        pdu = struct.pack(">BBI", 4, 0, len(pdv)) + pdv
        for piece in (pdu[:3], pdu[3:20], pdu[20:]):
            s.sendall(piece)
            time.sleep(0.2)
        kind, body = recv_pdu(s)
        assert kind == 0x04
        # Two requests in one write: the second is read with the first.
        s.sendall(pdu + pdu)
        assert recv_pdu(s)[0] == 0x04
        assert recv_pdu(s)[0] == 0x04
        s.close()
    finally:
        h.stop()


# ---- a real cluster ---------------------------------------------------------------

def test_router_tls_cluster(tmp_path, certs, images):
    want = reference(tmp_path, images)
    dest = TlsScp(tmp_path / "dest", "TLSDEST", certs["server"], certs["ca"])
    srv, ca = certs["server"], certs["ca"]
    # Port 0: each router picks a free TLS port and logs it.
    tls = {"tls": {"enabled": "true", "port": "0", "certificate": str(srv.cert),
                   "key": str(srv.key), "ca": str(ca.cert), "verify_peer": "true"},
           "destinations": {"TLSDEST": f"127.0.0.1:{dest.port} tls"}}
    try:
        with spcluster.Cluster(tmp_path / "c", nodes=3, routers=2, router_extra=tls) as c:
            r = c.routers[0]
            tls_port = int(re.search(r"DICOM TLS on 127\.0\.0\.1:(\d+);", r.log_text()).group(1))
            round_trip(tmp_path, certs, images, tls_port, dest, want)
            # Refused where they must be, the router answering on.
            assert echo(tls_port, certs["foreign"], ca, check=False).returncode != 0
            assert echo(r.port, certs["client"], ca, check=False).returncode != 0
            assert run(["echoscu", "-aec", AE, "127.0.0.1", tls_port],
                       check=False).returncode != 0
            echo(tls_port, certs["client"], ca)
            # A second router with plain DICOM off serves TLS only.
            r2 = c.routers[1]
            r2.stop()
            port2 = spcluster.free_port()
            r2.extra = {**tls, "dicom": {"plain": "false"}, "tls": {**tls["tls"],
                                                                     "port": str(port2)}}
            r2.start(port=port2)
            assert "DICOM TLS only;" in r2.log_text(this_run=True)
            p = run(["findscu", "-S", "-aec", AE, *tls_args(certs["client"], ca), "-k",
                     "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1", port2])
            assert all(s in p.stdout + p.stderr for s in images["studies"])
    finally:
        dest.stop()


def test_access_rules_by_certificate_subject(tmp_path, certs, images):
    """[access] rules that name a certificate subject (router/access.c) match
    the subject the TLS handshake verified: modality1's certificate may
    store, a second certificate from the same CA may only echo, and on the
    plain port (no subject) the same calling AE may not even associate."""
    ca, srv = certs["ca"], certs["server"]
    reader = tlscerts.make_cert(ca, certs["dir"] / "reader", "reader1")
    rules = tmp_path / "rules.txt"
    rules.write_text('* subject="CN=modality1,*" allow=store,find,echo\n'
                     '* subject="CN=reader1,*" allow=echo\n')
    extra = {"tls": {"enabled": "true", "port": "0", "certificate": str(srv.cert),
                     "key": str(srv.key), "ca": str(ca.cert), "verify_peer": "true"},
             "access": {"rules": str(rules)}}
    with spcluster.Cluster(tmp_path / "c", nodes=3, router_extra=extra) as c:
        r = c.routers[0]
        tls_port = int(re.search(r"DICOM TLS on 127\.0\.0\.1:(\d+);", r.log_text()).group(1))
        one = images["paths"][:1]
        run(["storescu", "-aec", AE, *tls_args(certs["client"], ca), "127.0.0.1", tls_port,
             *one])
        p = run(["storescu", "-d", "-aec", AE, *tls_args(reader, ca), "127.0.0.1", tls_port,
                 *one], check=False)
        assert spcluster.dimse_statuses(p.stdout + p.stderr) == [0x0124], p.stdout[-2000:]
        echo(tls_port, reader, ca)
        p = run(["echoscu", "-aec", AE, "127.0.0.1", r.port], check=False)
        assert p.returncode != 0 and "Association Rejected" in p.stdout + p.stderr, p.stdout
