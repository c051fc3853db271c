"""Hosts in network namespaces, for fault tests across machines and sites.

Every host (a storage node, a router, a site's DICOM clients) gets its own
network namespace with one interface, `eth0`, and one address, 10.77.S.H/24
(S: the site's number, H: the host's). The other end of its veth pair is a
port of its site's bridge `brS`, and every bridge lives in one "switch"
namespace, so the machine's own namespace gains nothing but the namespace
names (no interface, no route, no iptables rule). A host's only route is
10.77.0.0/16 via its site's gateway 10.77.S.254 (the bridge's address): no
packet can leave the namespaces made here. Namespaces are named
`spnet-PID-K-HOST` and deleted by that prefix at the end (`Net.close`, also
from a fixture's finally); `reap_stale()` removes those of a test process
that died.

Within a site, hosts talk over their bridge at kernel speed. Traffic between
sites is routed (policy routing in the switch namespace: what comes in on
`brS` for another site goes out on the TUN device `wanS`) through a small
user-space delay line, the "WAN" (this file run as `netns.py wan`, one
process in the switch namespace): it reads each packet from the source
site's TUN device and writes it into the destination site's after the
pair's delay, plus a uniform jitter, or drops it with the pair's loss rate;
packets of one pair keep their order (a WAN link does not reorder). It
stands in for `tc netem`, whose qdisc the kernels these tests run on may
lack (it is a module; the Firecracker kernel here has none).

Faults, each undone by `heal()`:
- partitions: iptables DROP rules in the receiving hosts' namespaces (chain
  SPCUT on INPUT), by source address: symmetric between two groups
  (`partition`) or one-way (`cut`, packets from one group to the other
  are lost, those back still arrive);
- a host's link down and up (`link`: the switch's end of its veth);
- WAN delay, jitter and loss between two sites (`wan`).

Processes run in a host with `host.prefix + argv` (["ip", "netns", "exec",
NS, ...]; exec keeps the process id, so signals reach the program itself).
`close()` kills every process left in the namespaces (by `ip netns pids`),
then deletes them.

Needs root, iproute2 and iptables; `unavailable()` says why not, for a skip.
"""
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

PREFIX = "spnet-"
NET = "10.77"
_counter = itertools.count(1)


def _ip(*args, check=True):
    p = subprocess.run(["ip", *map(str, args)], capture_output=True, timeout=20)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {p.stderr.decode().strip()}")
    return p


def _in(ns, *args, check=True):
    """Runs args inside namespace ns."""
    p = subprocess.run(["ip", "netns", "exec", ns, *map(str, args)], capture_output=True,
                       timeout=20)
    if check and p.returncode != 0:
        raise RuntimeError(f"[{ns}] {' '.join(map(str, args))}: {p.stderr.decode().strip()}")
    return p


def _namespaces():
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.decode().splitlines() if line.strip()]


def _delete_ns(ns):
    """Kills every process in ns (SIGCONT first: a paused one must die too),
    then deletes it."""
    p = _ip("netns", "pids", ns, check=False)
    for pid in p.stdout.decode().split():
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass
    _ip("netns", "del", ns, check=False)


def reap_stale():
    """Deletes the namespaces of test processes that are gone (a run killed
    before its clean-up)."""
    for ns in _namespaces():
        if not ns.startswith(PREFIX):
            continue
        try:
            pid = int(ns[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
            continue  # its owner still runs
        except (ValueError, ProcessLookupError):
            pass
        _delete_ns(ns)


def unavailable():
    """None when namespaces can be used here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            return f"{tool} is not installed (deploy/install-deps.sh installs iproute2 iptables)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (the WAN delay line needs TUN devices)"
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        p = _ip("netns", "add", ns, check=False)
        if p.returncode != 0:
            return f"cannot create a network namespace: {p.stderr.decode().strip()}"
        p = _in(ns, "iptables", "-w", "-L", "INPUT", check=False)
        if p.returncode != 0:
            return f"iptables does not work in a namespace: {p.stderr.decode().strip()}"
        p = _in(ns, "ip", "link", "add", "b0", "type", "bridge", check=False)
        if p.returncode != 0:
            return f"cannot create a bridge: {p.stderr.decode().strip()}"
    finally:
        _ip("netns", "del", ns, check=False)
    return None


class Host:
    """One namespace with one address; `prefix` runs a command in it."""

    def __init__(self, net, name, site, index):
        self.net, self.name, self.site, self.index = net, name, site, index
        self.ns = f"{net.id}-{name}"
        self.addr = f"{NET}.{site}.{index}"
        self.port = f"v{site}x{index}"  # its veth end on the switch
        self.prefix = ["ip", "netns", "exec", self.ns]

    def run(self, *args, check=True):
        return _in(self.ns, *args, check=check)

    def __repr__(self):
        return f"Host({self.name} {self.addr})"


class Net:
    """The switch namespace, its sites and hosts, the WAN process and the
    faults. Use as a context manager or call close()."""

    def __init__(self):
        reap_stale()
        self.id = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.sw = f"{self.id}-sw"
        self.sites = {}   # site name -> number
        self.hosts = {}   # host name -> Host
        self.cuts = set()  # (receiving host, sending host) with a DROP rule
        self.wan_proc = None
        self.closed = False
        try:
            _ip("netns", "add", self.sw)
            _in(self.sw, "ip", "link", "set", "lo", "up")
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.default.rp_filter=0",
                        "net.ipv4.conf.all.send_redirects=0",
                        "net.ipv4.conf.default.send_redirects=0"):
                _in(self.sw, "sysctl", "-qw", key)
            self.wan_proc = subprocess.Popen(
                [*self.switch_prefix, sys.executable, os.path.abspath(__file__), "wan"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        except BaseException:
            self.close()
            raise

    @property
    def switch_prefix(self):
        return ["ip", "netns", "exec", self.sw]

    def _wan(self, **cmd):
        self.wan_proc.stdin.write(json.dumps(cmd) + "\n")
        self.wan_proc.stdin.flush()
        line = self.wan_proc.stdout.readline()
        assert line.startswith("ok"), f"wan: {line!r} for {cmd}"
        return json.loads(line[2:]) if line[2:].strip() else None

    def add_site(self, name) -> int:
        """A site: its bridge (gateway 10.77.S.254) and its WAN port."""
        s = len(self.sites) + 1
        br, tun = f"br{s}", f"wan{s}"
        _in(self.sw, "ip", "link", "add", br, "type", "bridge")
        _in(self.sw, "ip", "addr", "add", f"{NET}.{s}.254/24", "dev", br)
        _in(self.sw, "ip", "link", "set", br, "up")
        _in(self.sw, "ip", "tuntap", "add", "dev", tun, "mode", "tun")
        self._wan(attach=tun, site=s)
        _in(self.sw, "ip", "link", "set", tun, "up")
        _in(self.sw, "sysctl", "-qw", f"net.ipv4.conf.{tun}.rp_filter=0")
        _in(self.sw, "sysctl", "-qw", f"net.ipv4.conf.{br}.rp_filter=0")
        _in(self.sw, "ip", "route", "add", f"{NET}.0.0/16", "dev", tun, "table", 100 + s)
        _in(self.sw, "ip", "rule", "add", "iif", br, "lookup", 100 + s, "pref", 100 + s)
        self.sites[name] = s
        return s

    def add_host(self, name, site) -> Host:
        """A namespace on `site` (made on first use) with its address."""
        if site not in self.sites:
            self.add_site(site)
        s = self.sites[site]
        h = Host(self, name, s, 1 + sum(1 for x in self.hosts.values() if x.site == s))
        assert h.index < 254
        _ip("netns", "add", h.ns)
        self.hosts[name] = h
        h.run("ip", "link", "set", "lo", "up")
        _in(self.sw, "ip", "link", "add", h.port, "type", "veth", "peer", "name", "eth0",
            "netns", h.ns)
        _in(self.sw, "ip", "link", "set", h.port, "master", f"br{s}")
        _in(self.sw, "ip", "link", "set", h.port, "up")
        h.run("ip", "addr", "add", f"{h.addr}/24", "dev", "eth0")
        h.run("ip", "link", "set", "eth0", "up")
        h.run("ip", "route", "add", f"{NET}.0.0/16", "via", f"{NET}.{s}.254")
        h.run("iptables", "-w", "-N", "SPCUT")
        h.run("iptables", "-w", "-I", "INPUT", "-j", "SPCUT")
        return h

    def site_hosts(self, site):
        s = self.sites[site]
        return [h for h in self.hosts.values() if h.site == s]

    def _resolve(self, group):
        """Hosts of a group: a host, a host name, a site name, or a list of them."""
        if isinstance(group, (str, Host)):
            group = [group]
        out = []
        for g in group:
            if isinstance(g, Host):
                out.append(g)
            elif g in self.hosts:
                out.append(self.hosts[g])
            else:
                out += self.site_hosts(g)
        return out

    def cut(self, senders, receivers):
        """One-way: packets from every sender host to every receiver host are
        dropped on arrival (the receiver's INPUT), the other way still works."""
        for r in self._resolve(receivers):
            for s in self._resolve(senders):
                if s is r or (r.name, s.name) in self.cuts:
                    continue
                r.run("iptables", "-w", "-A", "SPCUT", "-s", s.addr, "-j", "DROP")
                self.cuts.add((r.name, s.name))

    def partition(self, side_a, side_b):
        """Symmetric: no packet between the two groups in either direction."""
        self.cut(side_a, side_b)
        self.cut(side_b, side_a)

    def isolate(self, host):
        """`host` cut from every other host, both ways."""
        h = self._resolve(host)
        self.partition(h, [x for x in self.hosts.values() if x not in h])

    def heal(self, links=True):
        """Removes every cut (and WAN loss/delay is left as set: see wan());
        brings every link up again when `links`."""
        for name in sorted({r for r, _ in self.cuts}):
            self.hosts[name].run("iptables", "-w", "-F", "SPCUT")
        self.cuts.clear()
        if links:
            for h in self.hosts.values():
                self.link(h, True)

    def link(self, host, up):
        """The switch's end of the host's veth down (the host loses carrier)
        or up."""
        for h in self._resolve(host):
            _in(self.sw, "ip", "link", "set", h.port, "up" if up else "down")

    def wan(self, site_a, site_b, delay_ms=0.0, jitter_ms=0.0, loss=0.0, both=True):
        """Delay (± uniform jitter, milliseconds) and loss (0..1) of packets
        from site_a to site_b (and back, when both)."""
        a, b = self.sites[site_a], self.sites[site_b]
        for x, y in ((a, b), (b, a)) if both else ((a, b),):
            self._wan(set=[x, y], delay=delay_ms, jitter=jitter_ms, loss=loss)

    def wan_stats(self):
        """{'forwarded': n, 'dropped': n} of the WAN process so far."""
        return self._wan(stats=1)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            if self.wan_proc and self.wan_proc.poll() is None:
                self.wan_proc.kill()
                self.wan_proc.wait(timeout=10)
        finally:
            for ns in _namespaces():
                if ns.startswith(self.id + "-"):
                    _delete_ns(ns)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the WAN: a user-space delay line between the sites' TUN devices ------------------

def wan_main():
    """Commands on stdin, one JSON object a line, each answered "ok [JSON]":
    {"attach": TUN, "site": S}, {"set": [S, D], "delay": ms, "jitter": ms,
    "loss": p}, {"stats": 1}. Exits when stdin closes."""
    import fcntl
    import heapq
    import selectors
    import struct
    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    sel = selectors.DefaultSelector()
    os.set_blocking(0, False)
    sel.register(0, selectors.EVENT_READ, None)
    fds = {}       # site -> fd
    params = {}    # (src, dst) -> (delay s, jitter s, loss)
    last = {}      # (src, dst) -> due time of the last packet queued
    heap, seq = [], itertools.count()
    stats = {"forwarded": 0, "dropped": 0}
    rng = random.Random(1)
    inbuf = b""

    def command(cmd):
        if "attach" in cmd:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", cmd["attach"].encode(),
                                                   IFF_TUN | IFF_NO_PI))
            fds[cmd["site"]] = fd
            sel.register(fd, selectors.EVENT_READ, cmd["site"])
            return None
        if "set" in cmd:
            params[tuple(cmd["set"])] = (cmd["delay"] / 1000.0, cmd["jitter"] / 1000.0,
                                         cmd["loss"])
            return None
        return dict(stats)

    while True:
        now = time.monotonic()
        timeout = max(0.0, heap[0][0] - now) if heap else None
        for key, _ in sel.select(timeout):
            if key.data is None:
                chunk = os.read(0, 65536)
                if not chunk:
                    return
                inbuf += chunk
                while b"\n" in inbuf:
                    line, inbuf = inbuf.split(b"\n", 1)
                    res = command(json.loads(line))
                    sys.stdout.write("ok" + (" " + json.dumps(res) if res else "") + "\n")
                    sys.stdout.flush()
                continue
            src = key.data
            while True:
                try:
                    pkt = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[18] not in fds:
                    stats["dropped"] += 1
                    continue
                dst = pkt[18]
                delay, jitter, loss = params.get((src, dst), (0.0, 0.0, 0.0))
                if loss and rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                t = time.monotonic()
                due = t + max(0.0, delay + (rng.uniform(-jitter, jitter) if jitter else 0.0))
                due = max(due, last.get((src, dst), 0.0))  # FIFO per pair
                last[(src, dst)] = due
                heapq.heappush(heap, (due, next(seq), dst, pkt))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(fds[dst], pkt)
                stats["forwarded"] += 1
            except OSError:
                stats["dropped"] += 1


if __name__ == "__main__":
    if sys.argv[1:] == ["wan"]:
        wan_main()
    else:
        sys.exit("usage: netns.py wan   (the WAN delay line; started by Net)")
