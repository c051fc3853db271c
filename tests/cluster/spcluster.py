"""Helpers for process-level tests: keys, configuration files and real
shardpacs-node processes on free loopback ports, driven with the real
`shardpacs` command line client.

Every process a test starts is stopped by the fixture that started it."""
import os
import signal
import subprocess
import time
from pathlib import Path

BUILD = Path(os.environ.get("SP_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
NODE_BIN = BUILD / "shardpacs-node"
CLI_BIN = BUILD / "shardpacs"


def run_cli(*args, check=True, timeout=60, env=None):
    """Runs the shardpacs CLI; returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([str(CLI_BIN), *map(str, args)], capture_output=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"shardpacs {' '.join(map(str, args))} failed "
                             f"({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


def keygen(path: Path, pub: Path = None) -> str:
    """Makes a key pair file (and optionally a public key file); returns the
    public key."""
    args = ["keygen", path] + ([pub] if pub else [])
    return run_cli(*args).stdout.decode().strip()


class Node:
    """One shardpacs-node process with its own folder, keys and config."""

    def __init__(self, root: Path, name: str, cluster_keys: Path, extra: str = ""):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = self.dir / "node.key"
        self.pub = self.dir / "node.pub"
        self.public = keygen(self.key, self.pub)
        self.cluster_keys = cluster_keys
        self.config = self.dir / "node.conf"
        self.config.write_text(
            f"[node]\nid = {name}\nlisten = tcp://127.0.0.1:*\ndata_dir = data\n"
            f"[keys]\nkey_pair = node.key\ncluster_keys = {cluster_keys}\n"
            f"[log]\nlevel = info\n{extra}")
        self.ready = self.dir / "ready"
        self.log = self.dir / "node.log"
        self.proc = None
        self.endpoint = None

    def start(self, timeout=20):
        if self.ready.exists():
            self.ready.unlink()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([str(NODE_BIN), "--config", str(self.config),
                                      "--ready-file", str(self.ready)],
                                     stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists():
                self.endpoint = self.ready.read_text().strip()
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited {self.proc.returncode}: "
                                     f"{self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"node {self.name} not ready: {self.log.read_text()}")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, key: Path, *args, check=True, timeout=60, env=None):
        """Runs `shardpacs node ... ARGS` against this node with key pair `key`."""
        return run_cli("node", "--connect", self.endpoint, "--server-key", self.pub,
                       "--key", key, *args, check=check, timeout=timeout, env=env)
