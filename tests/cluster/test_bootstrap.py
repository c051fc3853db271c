"""`shardpacs bootstrap`: the folders it writes make a working cluster.
Three nodes at two sites and a router on loopback ports are bootstrapped,
each started from nothing but its own folder (as if copied to
/etc/shardpacs), and the cluster answers: every node alive in the
operator's `shardpacs status` (the admin key from DIR/admin) with its site,
and the router answering C-ECHO once it listens. Bad arguments and an
existing folder are refused."""
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spcluster as sc  # noqa: E402

AE = "SHARDPACS"


def boot(*args):
    return subprocess.run([str(sc.CLI_BIN), "bootstrap", *map(str, args)], capture_output=True,
                          timeout=60)


def test_bootstrap_refuses_bad_input(tmp_path):
    out = tmp_path / "b"
    assert boot("--out", out, "--node", "n1=nohost").returncode == 2
    assert boot("--out", out, "--node", "n1=h:1", "--node", "n1=h:2").returncode == 2
    assert boot("--out", out, "--node", "admin=h:1").returncode == 2
    assert boot("--out", out, "--router", "r1=h:1").returncode == 2  # no node
    assert not out.exists()
    out.mkdir()
    p = boot("--out", out, "--node", "n1=127.0.0.1:1")
    assert p.returncode == 1 and b"must not exist" in p.stderr


def test_bootstrapped_cluster_works(tmp_path):
    out, state = tmp_path / "cluster", tmp_path / "state"
    ports = [sc.free_port() for _ in range(4)]
    dicom = sc.free_port()
    p = boot("--out", out, "--state-dir", state, "--dicom-port", dicom,
             "--node", f"n1=127.0.0.1:{ports[0]}@a", "--node", f"n2=127.0.0.1:{ports[1]}@b",
             "--node", f"n3=127.0.0.1:{ports[2]}@a", "--router", f"r1=127.0.0.1:{ports[3]}@a")
    assert p.returncode == 0, p.stderr
    assert b"3 nodes, 1 routers, N=3 W=2" in p.stdout
    keys = (out / "n1" / "cluster.keys").read_text()
    for name, role in (("n1", "node"), ("n2", "node"), ("n3", "node"), ("r1", "router"),
                       ("admin", "admin")):
        assert re.search(rf"^\S{{40}} {name} {role}$", keys, re.M), keys
    assert (out / "n1" / "n1.key").stat().st_mode & 0o077 == 0
    assert (out / "admin" / "admin.key").exists()
    conf = (out / "n2" / "n2.conf").read_text()
    assert "site = b" in conf and f"n1@tcp://127.0.0.1:{ports[0]}" in conf
    assert f"n2@tcp://127.0.0.1:{ports[1]}" not in conf  # not its own seed

    procs = []
    try:
        for name in ("n1", "n2", "n3", "r1"):
            folder = out / name
            (state / name).mkdir(parents=True)  # what the unit's StateDirectory makes
            text = (folder / f"{name}.conf").read_text()
            # One machine here: every process's admin port on a free one.
            text = re.sub(r"listen = 127\.0\.0\.1:910\d", "listen = 127.0.0.1:0", text)
            text = text.replace("bind = 0.0.0.0", "bind = 127.0.0.1")
            (folder / f"{name}.conf").write_text(text)
            binary = sc.ROUTER_BIN if name == "r1" else sc.NODE_BIN
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append(subprocess.Popen([str(binary), "--config", str(folder / f"{name}.conf")],
                                          stdout=log, stderr=log))
        sc.wait_until(lambda: f"listening on 127.0.0.1:{dicom};" in
                      (tmp_path / "r1.log").read_text(errors="replace"), 60, "router listening")

        def status():
            r = subprocess.run([str(sc.CLI_BIN), "status", "--connect",
                                f"tcp://127.0.0.1:{ports[0]}", "--server-key",
                                str(out / "n1" / "n1.pub"), "--key",
                                str(out / "admin" / "admin.key"), "--json"],
                               capture_output=True, timeout=30)
            if r.returncode != 0:
                return None
            s = json.loads(r.stdout)
            states = {m["id"]: m["state"] for m in s["members"]}
            return s if all(states.get(n) == "alive" for n in ("n1", "n2", "n3")) else None

        s = sc.wait_until(status, 90, "every bootstrapped node alive")
        sites = {m["id"]: m.get("site") for m in s["members"]}
        assert sites["n2"] == "b" and sites["n1"] == "a"
        sc.dcmtk(["echoscu", "-aec", AE, "127.0.0.1", dicom])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
