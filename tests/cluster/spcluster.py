"""Helpers for process-level tests: keys, configuration files and real
shardpacs-node processes on free loopback ports, driven with the real
`shardpacs` command line client; whole gossiping clusters (N nodes and any
number of shardpacs-router processes with real CURVE keys, `cluster()`;
nodes can be added, killed, paused and restarted); DCMTK tool helpers (every
DCMTK tool runs with TCP_NODELAY=1: Debian's DCMTK 3.6.7 leaves Nagle's
algorithm on unless that variable is set, and each exchange then stalls for
45-90 ms), a bit-preserving storescp (`Scp`) and a minimal raw DICOM client
(`raw_store`) for requests no DCMTK tool will send.

Configuration text is merged per section and key (`merge_ini`): the loaders
refuse a key given twice, so options a caller passes replace the defaults
written here instead of repeating them.

Every process a test starts is stopped by the fixture that started it.

The programs come from the build folder SP_BUILD_DIR (tests/run.sh and CTest
set it), by default build/ at the top of this repository."""
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

BUILD = Path(os.environ.get("SP_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
NODE_BIN = BUILD / "shardpacs-node"
CLI_BIN = BUILD / "shardpacs"
ROUTER_BIN = BUILD / "shardpacs-router"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
DCMTK_TIMEOUT = 60


def run_cli(*args, check=True, timeout=60, env=None, prefix=None):
    """Runs the shardpacs CLI (after the command prefix `prefix`, e.g.
    ["ip", "netns", "exec", NS]); returns the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([*(prefix or []), str(CLI_BIN), *map(str, args)], capture_output=True,
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


# ---- configuration text -------------------------------------------------------------

def parse_ini(text) -> dict:
    """{section: {key: value}} of INI text (or a dict of that shape, copied),
    in order; comments and blank lines are dropped."""
    if isinstance(text, dict):
        return {sec: dict(keys) for sec, keys in text.items()}
    out, section = {}, None
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            out.setdefault(section, {})
            continue
        assert section is not None and "=" in line, f"not an option line: {raw!r}"
        key, value = line.split("=", 1)
        out[section][key.strip()] = value.strip()
    return out


def merge_ini(*parts) -> str:
    """INI text of every part (INI text or {section: {key: value}}) merged in
    order: a later part's key replaces an earlier one's in the same section,
    so no key is given twice."""
    merged = {}
    for part in parts:
        for sec, keys in parse_ini(part).items():
            merged.setdefault(sec, {}).update(keys)
    return "".join(f"[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                   for sec, keys in merged.items())


# Short membership timings for tests: a dead member is suspect within a few
# probes and down about a second later; nothing goes out (re-replicated)
# unless a test asks for it.
TEST_GOSSIP = {"gossip": {"probe_interval": "200ms", "probe_timeout": "100ms",
                          "suspicion_mult": "3", "suspicion_max_mult": "2",
                          "sync_interval": "1s", "down_to_out": "10m"}}
# Repair rounds every second (a node announces itself alive after its first).
TEST_REPAIR = {"repair": {"interval": "1s"}}

_help_cache = {}


def binary_knows_section(binary: Path, section: str) -> bool:
    """True if `binary --help-config` lists [section] (older builds may not)."""
    key = (str(binary), section)
    if key not in _help_cache:
        p = subprocess.run([str(binary), "--help-config"], capture_output=True, timeout=20)
        _help_cache[key] = f"[{section}]" in p.stdout.decode(errors="replace")
    return _help_cache[key]


MEMBER_LINE = re.compile(r"member (\S+) (new|alive|suspect|down|out|joining|draining|left) -> "
                         r"(alive|suspect|down|out|joining|draining|left)\b")


def member_states(log_text: str) -> dict:
    """{member: state} as a process's log last reported each one (the
    membership logs every change it sees: "member n2 alive -> suspect ...")."""
    out = {}
    for m in MEMBER_LINE.finditer(log_text):
        out[m.group(1)] = m.group(3)
    return out


class Node:
    """One shardpacs-node process with its own folder, keys and config. It
    listens on `addr` (a free port) and its process, like every CLI call to
    it, starts after the command prefix `prefix` (e.g. ["ip", "netns",
    "exec", NS] to run it in a network namespace; tests/cluster/netns.py)."""

    def __init__(self, root: Path, name: str, cluster_keys: Path, extra: str = "",
                 prefix=None, addr="127.0.0.1"):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = self.dir / "node.key"
        self.pub = self.dir / "node.pub"
        self.public = keygen(self.key, self.pub)
        self.cluster_keys = cluster_keys
        self.prefix, self.addr = list(prefix or []), addr
        self.config = self.dir / "node.conf"
        self.config.write_text(
            f"[node]\nid = {name}\nlisten = tcp://{addr}:*\ndata_dir = data\n"
            f"[keys]\nkey_pair = node.key\ncluster_keys = {cluster_keys}\n"
            f"[log]\nlevel = info\n{extra}")
        self.ready = self.dir / "ready"
        self.log = self.dir / "node.log"
        self.proc = None
        self.endpoint = None
        self.site = None
        self.log_offset = 0

    def configure(self, *overrides):
        """Merges options (INI text or {section: {key: value}}) into the
        config file, replacing keys already there (read at the next start)."""
        self.config.write_text(merge_ini(self.config.read_text(), *overrides))

    def start(self, timeout=20):
        if self.ready.exists():
            self.ready.unlink()
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*self.prefix, str(NODE_BIN), "--config", str(self.config),
                                      "--ready-file", str(self.ready)],
                                     stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.exists() and self.ready.read_text().strip():
                self.endpoint = self.ready.read_text().strip()
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited {self.proc.returncode}: "
                                     f"{self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"node {self.name} not ready: {self.log.read_text()}")

    def pin_endpoint(self):
        """Makes later starts listen on the endpoint this start got (so that
        routers configured with it reach the node again after a restart)."""
        assert self.endpoint, "start the node first"
        text = self.config.read_text()
        self.config.write_text(re.sub(r"(?m)^listen = .*$", f"listen = {self.endpoint}", text,
                                      count=1))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def restart(self, timeout=20):
        """Starts the node again (after kill9 or stop) on its pinned endpoint,
        retrying briefly if the port is not free yet."""
        old = self.endpoint
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.start(timeout=max(1, deadline - time.monotonic()))
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert old is None or self.endpoint == old, (old, self.endpoint)
        return self

    def stop(self):
        """SIGTERM (SIGKILL after 15 s); returns the exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.send_signal(signal.SIGCONT)  # a paused node must see the SIGTERM
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def pause(self):
        """SIGSTOP: the process stays but answers nothing (resume() undoes it)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self, this_run=False):
        """The node's log (only what the current process wrote, if this_run)."""
        if not self.log.exists():
            return ""
        data = self.log.read_bytes()
        return data[self.log_offset if this_run else 0:].decode(errors="replace")

    def member_states(self) -> dict:
        """{member: state} as the current process last logged each one."""
        return member_states(self.log_text(this_run=True))

    def stats(self, key: Path) -> dict:
        """The node's `stats` answer as a dict."""
        import json
        return json.loads(self.cli(key, "stats").stdout.decode())

    def list_study(self, key: Path, study_uid: str) -> dict:
        """SOP Instance UID -> (transfer syntax, size, digest hex) of what the
        node holds of a study."""
        out = {}
        for line in self.cli(key, "list", study_uid).stdout.decode().splitlines():
            f = line.split()
            if len(f) >= 8:
                out[f[3]] = (f[5], int(f[6]), f[7])
        return out

    def cli(self, key: Path, *args, check=True, timeout=60, env=None):
        """Runs `shardpacs node ... ARGS` against this node with key pair `key`."""
        return run_cli("node", "--connect", self.endpoint, "--server-key", self.pub,
                       "--key", key, *args, check=check, timeout=timeout, env=env,
                       prefix=self.prefix)


# ---- DCMTK tools -------------------------------------------------------------------

def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0, proc=None):
    """Waits until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"process exited {proc.returncode} before listening")
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port}")


def dcmtk(args, timeout=DCMTK_TIMEOUT, check=True):
    """Runs a DCMTK tool with TCP_NODELAY=1; stdout and stderr are decoded
    (bytes that are not UTF-8 replaced) and joined into `.out`. Arguments
    given as bytes are passed as they are (e.g. Latin-1 key values)."""
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    p = subprocess.run(args, env=DCMTK_ENV, capture_output=True, timeout=timeout)
    p.stdout = p.stdout.decode("utf-8", "replace")
    p.stderr = p.stderr.decode("utf-8", "replace")
    p.out = p.stdout + p.stderr
    if check and p.returncode != 0:
        cmd = " ".join(a.decode("latin-1") if isinstance(a, bytes) else a for a in args)
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.out[-6000:]}")
    return p


def dimse_statuses(output: str):
    """DIMSE status codes a DCMTK tool run with -d printed, in order."""
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)]


def store_responses(output: str):
    """[(SOP Instance UID, status)] of every C-STORE response `storescu -d`
    printed, in order."""
    out = []
    for block in output.split("INCOMING DIMSE MESSAGE")[1:]:
        block = block.split("END DIMSE MESSAGE")[0]
        if "C-STORE RSP" not in block:
            continue
        uid = re.search(r"Affected SOP Instance UID\s*:\s*(\S+)", block)
        st = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", block)
        out.append((uid.group(1) if uid else None, int(st.group(1), 16) if st else None))
    return out


class Scp:
    """A bit-preserving storescp (accepting every transfer syntax with +xa
    unless accept_all is False) writing into its own directory."""

    def __init__(self, directory: Path, aet: str, accept_all=True, extra=()):
        """extra: more storescp options (e.g. +tls ...). A port taken by
        someone else between choosing and binding it is replaced."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.log = self.dir.parent / f"storescp-{aet}.log"
        for _ in range(5):
            self.port = free_port()
            args = ["storescp", "--bit-preserving", "-aet", aet, "-od", self.dir, "-uf"]
            if accept_all:
                args.append("+xa")
            args += list(extra)
            args.append(str(self.port))
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen([str(a) for a in args], env=DCMTK_ENV,
                                         stdout=logf, stderr=logf)
            logf.close()
            try:
                wait_port(self.port, proc=self.proc)
                return
            except AssertionError:
                self.stop()
        raise AssertionError(f"storescp {aet} did not start: {self.log.read_text()}")

    def files(self) -> dict:
        """SOP Instance UID -> path of every file received."""
        import pydicom
        return {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID: p
                for p in self.dir.iterdir() if p.is_file()}

    def clear(self):
        for p in self.dir.iterdir():
            p.unlink()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- routers and whole clusters ------------------------------------------------------

class Router:
    """One shardpacs-router process: its own key pair (which must be listed
    in the cluster keys), a config joining gossip through the given nodes
    (seeds: every node's NAME@endpoint, read when the router starts) and
    naming the C-MOVE destinations, and a DICOM port chosen here (retried
    when taken). `cluster_opts` are [cluster] options and `extra` any other
    options (INI text or {section: {key: value}}); both replace the defaults
    written here key by key. The router binds gossip and DICOM to `addr`
    and starts after the command prefix `prefix` (as for Node)."""

    def __init__(self, root: Path, name: str, cluster_keys: Path, nodes, ae_title="SHARDPACS",
                 replicas=3, quorum=2, dests=None, cluster_opts=None, extra="", site=None,
                 prefix=None, addr="127.0.0.1"):
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ae = ae_title
        self.key = self.dir / "router.key"
        self.public = keygen(self.key)
        self.cluster_keys = Path(cluster_keys)
        self.nodes = list(nodes)
        self.replicas, self.quorum = replicas, quorum
        self.dests = dict(dests or {})
        self.cluster_opts = dict(cluster_opts or {})
        self.extra = extra
        self.site = site
        self.prefix, self.addr = list(prefix or []), addr
        self.config = self.dir / "router.conf"
        self.log = self.dir / "router.log"
        self.proc = None
        self.port = None
        self.log_offset = 0

    def _write_config(self):
        seeds = ",".join(f"{n.name}@{n.endpoint}" for n in self.nodes if n.endpoint)
        base = {"router": {"id": self.name, "listen": f"tcp://{self.addr}:*"},
                "dicom": {"ae_title": self.ae, "bind": self.addr, "port": str(self.port),
                          "acse_timeout": "5s"},
                "keys": {"key_pair": str(self.key), "cluster_keys": str(self.cluster_keys)},
                "cluster": {"seeds": seeds, "replicas": str(self.replicas),
                            "write_quorum": str(self.quorum)},
                "log": {"level": "info"}}
        if self.site:
            base["router"]["site"] = self.site
        if self.dests:
            base["destinations"] = {ae: f"127.0.0.1:{port}" for ae, port in self.dests.items()}
        self.config.write_text(merge_ini(base, TEST_GOSSIP, {"cluster": self.cluster_opts},
                                         self.extra))

    def start(self, timeout=40, port=None):
        """Starts on `port` (default: the previous one, else a free one) and
        returns once the router logged that it listens there (after it saw
        the first storage member in gossip, or its join_timeout). A free port
        taken by someone else meanwhile is replaced by another one."""
        for attempt in range(5):
            self.port = port or self.port or free_port()
            self._write_config()
            offset = self.log.stat().st_size if self.log.exists() else 0
            self.log_offset = offset
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen([*self.prefix, str(ROUTER_BIN), "--config",
                                          str(self.config)], stdout=logf, stderr=logf)
            logf.close()
            ready = f"listening on {self.addr}:{self.port};"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = self.log.read_bytes()[offset:].decode(errors="replace")
                if ready in text:
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
            self.stop()
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if "cannot start DICOM service" not in text or port is not None:
                raise AssertionError(f"router {self.name} did not start: {text}")
            self.port = None  # taken meanwhile: try another one
        raise AssertionError(f"router {self.name} did not start: {self.log_text()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        """SIGTERM (SIGKILL after 20 s); returns the exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def log_text(self, this_run=False):
        if not self.log.exists():
            return ""
        data = self.log.read_bytes()
        return data[self.log_offset if this_run else 0:].decode(errors="replace")

    def member_states(self) -> dict:
        """{member: state} as the current process last logged each one."""
        return member_states(self.log_text(this_run=True))


def wait_until(pred, timeout, what, last=None):
    """Polls pred() every 0.1 s until it returns something true (returned);
    raises AssertionError naming `what` (and last(), if given) after timeout
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"; last seen: {last()}" if last else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.1)


class Cluster:
    """N storage nodes gossiping with each other and one or more routers
    over them, all with real CURVE keys listed in one cluster key file
    (nodes as n1..nN, routers as router1.., plus an operator key `admin_key`
    for the shardpacs CLI).

    n1 starts first and is every other node's seed; once all run, each
    node's seeds are rewritten to every other node for its next start.
    Every node is pinned to the port it got, so kill9()/stop() and restart()
    bring it back where the others know it. Routers join gossip with every
    node as a seed. The constructor returns once every node and router has
    logged every storage node alive (bounded wait; each process logs member
    state changes). Routers are all made (and their keys listed) up front.

    Options: `cluster_opts` go to the routers' [cluster] section;
    `node_extra` / `router_extra` (INI text or {section: {key: value}}) are
    merged into every node's / router's configuration, replacing the test
    defaults (TEST_GOSSIP: short probes, down_to_out 10m; TEST_REPAIR for
    nodes) key by key; `sites` gives node i its [node] site and
    `router_sites` router i its [router] site. `hosts(name, site)`, when
    given, returns (command prefix, address) for the member of that name
    and site: where its process runs and what it binds to
    (tests/cluster/netns.py)."""

    def __init__(self, root: Path, nodes=3, replicas=3, quorum=2, dests=None, routers=1,
                 cluster_opts=None, sites=None, node_extra="", router_extra="",
                 wait_timeout=60, router_sites=None, hosts=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keys = self.root / "cluster.keys"
        self.keys.write_text("")
        self.admin_key = self.root / "admin.key"
        self._admin_pub = keygen(self.admin_key)
        self.replicas, self.quorum = replicas, quorum
        self.dests = dict(dests or {})
        self.cluster_opts = dict(cluster_opts or {})
        self.node_extra, self.router_extra = node_extra, router_extra
        self.hosts = hosts or (lambda name, site: (None, "127.0.0.1"))
        self.router_sites = list(router_sites or [])
        self.nodes = []
        for i in range(nodes):
            self._new_node(sites[i] if sites else None)
        self.routers = [self._new_router(f"router{i + 1}") for i in range(routers)]
        self._write_keys()
        try:
            for n in self.nodes:
                self._configure_node(n)
                n.start()
                n.pin_endpoint()
            for n in self.nodes:
                self._set_seeds(n)
            for r in self.routers:
                r.start()
            self.wait_alive(timeout=wait_timeout)
        except BaseException:
            self.stop()
            raise

    def _new_node(self, site=None) -> Node:
        name = f"n{len(self.nodes) + 1}"
        prefix, addr = self.hosts(name, site)
        n = Node(self.root, name, self.keys, prefix=prefix, addr=addr)
        n.site = site
        self.nodes.append(n)
        return n

    def _configure_node(self, n: Node):
        """The node's cluster options: replicas, test timings, the seed n1
        (none for n1 itself), its site, then node_extra on top."""
        base = {"node": {"site": n.site} if n.site else {},
                "cluster": {"replicas": str(self.replicas)}}
        first = self.nodes[0]
        if n is not first and first.endpoint:
            base["cluster"]["seeds"] = f"{first.name}@{first.endpoint}"
        parts = [base, TEST_GOSSIP]
        if binary_knows_section(NODE_BIN, "repair"):
            parts.append(TEST_REPAIR)
        n.configure(*parts, self.node_extra)

    def _set_seeds(self, n: Node):
        """Seeds for the node's next start: every other node, so a restarted
        node (n1 included) rejoins at once."""
        others = ",".join(f"{m.name}@{m.endpoint}" for m in self.nodes
                          if m is not n and m.endpoint)
        if others:
            n.configure({"cluster": {"seeds": others}})

    def _new_router(self, name):
        i = int(name[len("router"):]) - 1
        site = self.router_sites[i] if i < len(self.router_sites) else None
        prefix, addr = self.hosts(name, site)
        return Router(self.root, name, self.keys, self.nodes, replicas=self.replicas,
                      quorum=self.quorum, dests=self.dests, cluster_opts=self.cluster_opts,
                      extra=self.router_extra, site=site, prefix=prefix, addr=addr)

    def _write_keys(self):
        # Each key with its role (README "Access control and audit").
        lines = [f"{n.public} {n.name} node" for n in self.nodes]
        lines += [f"{r.public} {r.name} router" for r in self.routers]
        lines.append(f"{self._admin_pub} admin admin")
        tmp = self.keys.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.keys)

    @property
    def router(self) -> Router:
        return self.routers[0]

    def node(self, name) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def processes(self):
        """Every node and router whose process runs."""
        return [p for p in self.nodes + self.routers if p.alive()]

    def views(self) -> dict:
        """{process name: {member: state}} of every running node and router,
        as each last logged it."""
        return {p.name: p.member_states() for p in self.processes()}

    def sees(self, member: str, states, observers=None) -> bool:
        """True when every observer (default: every running node and router
        other than `member`) last logged `member` in one of `states`."""
        states = (states,) if isinstance(states, str) else tuple(states)
        observers = observers if observers is not None else \
            [p for p in self.processes() if p.name != member]
        return all(p.member_states().get(member) in states for p in observers)

    def wait_member(self, member: str, states, observers=None, timeout=30):
        """Waits until every observer sees `member` in one of `states`."""
        wait_until(lambda: self.sees(member, states, observers), timeout,
                   f"{member} {states} in every view", self.views)

    def wait_alive(self, names=None, timeout=60):
        """Waits until every running node and router has logged every running
        storage node in `names` (default all) alive."""
        def done():
            want = [n.name for n in self.nodes if n.alive() and (names is None or
                                                                 n.name in names)]
            return all(self.sees(m, "alive") for m in want)
        wait_until(done, timeout, "every storage node alive in every view", self.views)

    def add_node(self, site=None, start=True) -> Node:
        """A new storage node n<K+1>: its key is appended to the cluster key
        file (running members re-read it within about a second), it is
        seeded with every running node and started (unless start=False) and
        pinned. Returns without waiting for the others to see it (see
        wait_alive / wait_member)."""
        n = self._new_node(site)
        self._write_keys()
        time.sleep(1.2)  # let every running member pick up the new key first
        self._configure_node(n)
        seeds = ",".join(f"{m.name}@{m.endpoint}" for m in self.nodes
                         if m is not n and m.endpoint and m.alive())
        if seeds:
            n.configure({"cluster": {"seeds": seeds}})
        if start:
            n.start()
            n.pin_endpoint()
        return n

    def stop(self):
        """Stops routers, then nodes; returns {name: exit status}."""
        rcs = {}
        for r in self.routers:
            rcs[r.name] = r.stop()
        for n in self.nodes:
            rcs[n.name] = n.stop()
        return rcs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def cluster(tmp_path: Path, nodes=3, replicas=3, quorum=2, dests=None, routers=1,
            cluster_opts=None, sites=None, node_extra="", router_extra="") -> Cluster:
    """Starts `nodes` gossiping storage nodes and `routers` routers (AE
    SHARDPACS, each on its own free DICOM port) over them with
    N=`replicas`, W=`quorum` and the C-MOVE destinations `dests` ({AE: port
    on 127.0.0.1}), and waits until all of them see every node alive. The
    caller stops it (`with cluster(...) as c:` or `c.stop()`)."""
    return Cluster(tmp_path, nodes=nodes, replicas=replicas, quorum=quorum, dests=dests,
                   routers=routers, cluster_opts=cluster_opts, sites=sites,
                   node_extra=node_extra, router_extra=router_extra)


# ---- a minimal raw DICOM client ------------------------------------------------------
# For requests DCMTK's tools refuse to send: a data set without SOP Instance
# UID, one that differs from the command, a truncated one. One association,
# one C-STORE, implicit VR little endian unless told otherwise.

IMPLICIT_LE = "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _item(kind, payload):
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _even_uid(uid):
    b = uid.encode()
    return b + b"\0" if len(b) % 2 else b


def encode_dataset(ds, implicit=True) -> bytes:
    """A pydicom Dataset encoded as little endian data set bytes (no meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def _recv_pdu(sock):
    kind, _, length = struct.unpack(">BBI", _recv_exact(sock, 6))
    return kind, _recv_exact(sock, length)


def _command_elements(raw):
    """(tag -> bytes) of an implicit little endian command set."""
    out, off = {}, 0
    while off + 8 <= len(raw):
        g, e, length = struct.unpack_from("<HHI", raw, off)
        out[(g << 16) | e] = raw[off + 8:off + 8 + length]
        off += 8 + length
    return out


def raw_store(port, sop_class_uid, command_sop_uid, dataset: bytes, ae="SHARDPACS",
              transfer_syntax=IMPLICIT_LE, timeout=30, before_pdv=None):
    """Sends one C-STORE whose data set is exactly `dataset` (in
    transfer_syntax, fragmented into PDVs of at most 16 KB) and returns
    (status, error comment), or (None, "aborted") when the peer aborts the
    association instead of answering. Raises if the association is not
    accepted or the peer closes without answering. before_pdv(offset), when
    given, is called before each data set PDV is sent (to pace or stall)."""
    return raw_request(port, sop_class_uid, store_command(sop_class_uid, command_sop_uid),
                       dataset, ae, transfer_syntax, timeout, before_pdv)


def store_command(sop_class_uid, sop_uid, message_id=7):
    """The command set of a C-STORE-RQ with a data set, as a pydicom Dataset."""
    from pydicom.dataset import Dataset
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class_uid
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_uid
    return cmd


def encode_command(cmd) -> bytes:
    """A command set's bytes: implicit VR LE, led by its group length."""
    enc = encode_dataset(cmd)
    return struct.pack("<HHII", 0, 0, 4, len(enc)) + enc


def raw_find(port, identifier: bytes, ae="SHARDPACS", transfer_syntax=IMPLICIT_LE, timeout=30,
             sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1"):
    """Sends one C-FIND (Study Root by default) whose identifier is exactly
    `identifier` and returns the final (status, error comment), skipping
    pending responses; (None, "aborted") when the peer aborts."""
    from pydicom.dataset import Dataset
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class_uid
    cmd.CommandField = 0x0020
    cmd.MessageID = 9
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    return raw_request(port, sop_class_uid, cmd, identifier, ae, transfer_syntax, timeout)


def raw_request(port, sop_class_uid, cmd, dataset: bytes, ae="SHARDPACS",
                transfer_syntax=IMPLICIT_LE, timeout=30, before_pdv=None):
    """One association with one presentation context (sop_class_uid in
    transfer_syntax), one request (command data set cmd, then `dataset` in
    PDVs of at most 16 KB), the final response read (pending ones skipped),
    then release. Returns (status, error comment) or (None, "aborted")."""
    ctx = _item(0x30, _even_uid(sop_class_uid)) + _item(0x40, _even_uid(transfer_syntax))
    pres = _item(0x20, bytes([1, 0, 0, 0]) + ctx)
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, _even_uid("1.2.3.4")))
    body = (struct.pack(">HH", 1, 0) + ae.ljust(16).encode() + b"RAWSCU".ljust(16) + bytes(32) +
            _item(0x10, _even_uid("1.2.840.10008.3.1.1.1")) + pres + user)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        kind, pdu = _recv_pdu(s)
        assert kind == 0x02, f"association not accepted (PDU type {kind})"
        fragments = [(encode_command(cmd), 0x03)]
        step = 16000
        chunks = [dataset[i:i + step] for i in range(0, len(dataset), step)] or [b""]
        for i, c in enumerate(chunks):
            fragments.append((c, 0x02 if i == len(chunks) - 1 else 0x00))
        offset = 0
        for n, (payload, header) in enumerate(fragments):
            if n > 0 and before_pdv is not None:
                before_pdv(offset)
            pdv = struct.pack(">IBB", len(payload) + 2, 1, header) + payload
            s.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
            if n > 0:
                offset += len(payload)
        while True:
            rsp = b""
            while True:  # one command set; data sets of pending responses are skipped
                kind, pdu = _recv_pdu(s)
                if kind == 0x07:
                    return None, "aborted"
                assert kind == 0x04, f"expected P-DATA, got PDU type {kind}"
                length, _, header = struct.unpack_from(">IBB", pdu, 0)
                if header & 0x01:
                    rsp += pdu[6:4 + length]
                    if header & 0x02:
                        break
            el = _command_elements(rsp)
            status = struct.unpack("<H", el[0x00000900])[0]
            if status not in (0xFF00, 0xFF01):
                break
        s.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
        try:
            _recv_pdu(s)
        except (ConnectionError, OSError):
            pass
    comment = el.get(0x00000902, b"").decode(errors="replace").strip(" \0")
    return status, comment
