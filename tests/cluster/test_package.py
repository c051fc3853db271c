"""The Debian package and its systemd units: `cmake --build --target
package` makes a .deb; it is extracted into a temporary root (dpkg -x) and
must hold the programs, both template units, the example configurations
and the maintainer scripts; `systemd-analyze verify` passes on an instance
of each unit; and a node and a router from the extracted root, started the
way the units start them (ExecStart's arguments, NOTIFY_SOCKET set as for
Type=notify), say READY=1 only once they serve: at that moment the node's
health port and the router's DICOM port already answer."""
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset  # noqa: E402
import pydicom  # noqa: E402
import spcluster as sc  # noqa: E402

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    p = subprocess.run(["cmake", "--build", str(sc.BUILD), "--target", "package"],
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stdout.decode()[-3000:] + p.stderr.decode()[-3000:]
    debs = sorted(sc.BUILD.glob("shardpacs_*.deb"), key=lambda f: f.stat().st_mtime)
    assert debs, "no .deb in the build folder"
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    control = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(debs[-1]), str(control)], check=True)
    return root, control


def test_package_contents(root):
    root, control = root
    for f in ("usr/bin/shardpacs-node", "usr/bin/shardpacs-router", "usr/bin/shardpacs",
              "usr/lib/systemd/system/shardpacs-node@.service",
              "usr/lib/systemd/system/shardpacs-router@.service",
              "usr/share/doc/shardpacs/examples/node.conf",
              "usr/share/doc/shardpacs/examples/router.conf",
              "usr/share/doc/shardpacs/README.md"):
        assert (root / f).exists(), f
    fields = (control / "control").read_text()
    assert re.search(r"^Package: shardpacs$", fields, re.M)
    assert "libzmq5" in fields and "adduser" in fields  # shlibdeps ran
    postinst = (control / "postinst").read_text()
    assert "adduser --system" in postinst and "/var/lib/shardpacs" in postinst
    # The examples write only under the units' writable state folder.
    for conf in ("node.conf", "router.conf"):
        text = (root / "usr/share/doc/shardpacs/examples" / conf).read_text()
        assert "[admin]" in text and "/var/lib/shardpacs/" in text


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing")
def test_units_verify(root, tmp_path):
    root, _ = root
    for unit, inst in (("shardpacs-node@.service", "n1"), ("shardpacs-router@.service", "r1")):
        text = (root / "usr/lib/systemd/system" / unit).read_text()
        for want in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     "PrivateTmp=yes", "Restart=on-failure", "User=shardpacs",
                     "ReadWritePaths=/var/lib/shardpacs/%i", "StateDirectory=shardpacs/%i"):
            assert want in text, (unit, want)
        # An instance of the template, its program taken from the extracted
        # root (verify checks that ExecStart's program exists).
        text = text.replace("ExecStart=/usr/bin/", f"ExecStart={root}/usr/bin/")
        path = tmp_path / unit.replace("@.", f"@{inst}.")
        path.write_text(text)
        p = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True,
                           timeout=60)
        out = p.stdout.decode() + p.stderr.decode()
        assert p.returncode == 0, out
        assert path.name not in out, out  # no complaint about the unit itself


def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    s.bind(str(path))
    s.settimeout(60)
    return s, path


def test_started_as_the_units_do(root, tmp_path):
    root, _ = root
    keys = tmp_path / "cluster.keys"
    npub = sc.keygen(tmp_path / "n1.key")
    rpub = sc.keygen(tmp_path / "r1.key")
    keys.write_text(f"{npub} n1 node\n{rpub} r1 router\n")
    # What StateDirectory= makes before ExecStart runs.
    for d in ("n1", "r1"):
        (tmp_path / "state" / d).mkdir(parents=True)
    admin = sc.free_port()
    (tmp_path / "n1.conf").write_text(
        "[node]\nid = n1\nlisten = tcp://127.0.0.1:*\n"
        f"data_dir = {tmp_path}/state/n1/data\n"
        f"[keys]\nkey_pair = {tmp_path}/n1.key\ncluster_keys = {keys}\n"
        "[cluster]\nreplicas = 1\n[repair]\ninterval = 1s\n"
        f"[audit]\nfile = {tmp_path}/state/n1/audit.jsonl\n"
        f"[admin]\nlisten = 127.0.0.1:{admin}\n")
    sock, path = notify_socket(tmp_path)
    env = {"NOTIFY_SOCKET": str(path), "PATH": "/usr/bin:/bin"}
    log = open(tmp_path / "n1.log", "wb")
    node = subprocess.Popen([str(root / "usr/bin/shardpacs-node"), "--config",
                             str(tmp_path / "n1.conf"), "--ready-file",
                             str(tmp_path / "n1.ready")], env=env, stdout=log, stderr=log)
    router = None
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg
        # Serving already when it said so.
        assert requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=5).status_code == 200
        endpoint = (tmp_path / "n1.ready").read_text().strip()
        port = sc.free_port()
        (tmp_path / "r1.conf").write_text(
            "[router]\nid = r1\nlisten = tcp://127.0.0.1:*\n"
            f"[dicom]\nae_title = SHARDPACS\nbind = 127.0.0.1\nport = {port}\n"
            f"[keys]\nkey_pair = {tmp_path}/r1.key\ncluster_keys = {keys}\n"
            f"[cluster]\nreplicas = 1\nwrite_quorum = 1\nseeds = n1@{endpoint}\n"
            f"[audit]\nfile = {tmp_path}/state/r1/audit.jsonl\n")
        rlog = open(tmp_path / "r1.log", "wb")
        router = subprocess.Popen([str(root / "usr/bin/shardpacs-router"), "--config",
                                   str(tmp_path / "r1.conf")], env=env, stdout=rlog, stderr=rlog)
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg
        sc.dcmtk(["echoscu", "-aec", "SHARDPACS", "127.0.0.1", port])
        # A working single-machine archive: store, find, get (bit-exact).
        bulk = dataset.make_bulk_set(tmp_path / "data", small=6, ct=0, studies=2, seed=31)
        sc.dcmtk(["storescu", "-aec", "SHARDPACS", "127.0.0.1", port, *bulk.small_paths])
        found = sc.dcmtk(["findscu", "-S", "-aec", "SHARDPACS", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "StudyInstanceUID", "127.0.0.1", port])
        assert all(uid in found.out for uid in bulk.study_uids), found.out
        got = tmp_path / "got"
        got.mkdir()
        sc.dcmtk(["getscu", "-S", "-aec", "SHARDPACS", "-k", "QueryRetrieveLevel=STUDY", "-k",
                  f"StudyInstanceUID={bulk.study_uids[0]}", "-od", got, "127.0.0.1", port])
        sent = {pydicom.dcmread(str(f)).SOPInstanceUID: pydicom.dcmread(str(f)).PixelData
                for f in bulk.small_paths}
        back = {pydicom.dcmread(str(f)).SOPInstanceUID: pydicom.dcmread(str(f)).PixelData
                for f in got.iterdir()}
        assert back and all(sent[uid] == px for uid, px in back.items())
        router.terminate()
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert router.wait(timeout=30) == 0
    finally:
        for p in (router, node):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        log.close()
        sock.close()
