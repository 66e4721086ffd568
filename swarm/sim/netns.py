"""Home links for localhost swarms: one network namespace per node, veth pairs on a bridge, tc tbf.

:class:`NetnsLab` gives each node of a local swarm its own Linux network namespace with one
interface, ``eth0``, at its own address. The other end of each veth pair sits on a bridge in the
root namespace, which holds the address ``10.O.0.1``, so the harness still reaches every node's
/metrics and /health. With a :class:`~swarm.sim.link.LinkSpec`, ``tc tbf`` shapes both directions
of each node's link to the given rate:

- the **uplink** on ``eth0`` inside the node's namespace (what the node sends);
- the **downlink** on the bridge end of the pair (what the bridge delivers to the node).

tbf only shapes a device's egress, so one qdisc per end covers both directions, like an access
link with a symmetric rate. Everything a node sends is shaped: our streams, hivemind's DHT RPCs,
the libp2p handshakes, and anything a baseline process sends. This machine's kernel has no
``netem``, so a link's delay is added by the node itself, per frame (see swarm/sim/link.py).

With ``nat=True`` a node sits behind a **home router** of its own, like a volunteer's machine: the
router's namespace holds the WAN end on the bridge (the home's public address, where the link is
shaped) and a LAN link to the node's namespace (``10.L.i.2/24``, default route via the router at
``.1``); iptables masquerades everything leaving the WAN. The node can dial out; nobody on the bridge
can dial in: the public nodes have no route to the LAN, and the router forwards no port. Only the
harness in the root namespace has a route to each LAN (through its router), so it still reads the
node's /health and /metrics; replies to it are not masqueraded (conntrack sees them as replies).

Bytes on each link come from the bridge end's interface counters: what the link carried, headers
included (veth counts a segmentation-offload packet with one set of headers, so header overhead is
undercounted by up to a few percent), and including any traffic of the harness itself (its
/health polls).

Needs root. :func:`netns_unavailable` says why it cannot run (no root, no ``ip``/``tc``, namespaces
refused). Names carry the creating process id, so a lab whose creator died (SIGKILL, crash) is
removed by the next lab that starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from swarm.sim.iptables import find_iptables
from swarm.sim.link import LinkSpec

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^pw([0-9a-f]+)x(\d+)")
_labs_made = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out


def _tc(*args: str) -> None:
    out = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"`tc {' '.join(args)}` failed: {out.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why network-namespace links cannot be set up here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root (this process is not uid 0)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    probe = f"pw{os.getpid():x}x99p"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    try:  # the rest of what a lab needs: a veth pair and a tbf qdisc (inside the probe namespace)
        for args in (["link", "add", "name", "pwa", "type", "veth", "peer", "name", "pwb"], ["link", "set", "pwa", "up"]):
            out = _ip("-n", probe, *args, check=False)
            if out.returncode != 0:
                return f"cannot create a veth pair: {out.stderr.strip()}"
        tc = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "pwa", "root", *tbf_args(8e6)],
                            capture_output=True, text=True, timeout=30)
        if tc.returncode != 0:
            return f"tc tbf does not work here: {tc.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def tbf_args(rate_bps: float) -> list[str]:
    """tc tbf parameters for a rate: a bucket of 10 ms of traffic (at least 64 KiB, so one GSO
    packet fits) and 50 ms of queue before drops, like a modest home router."""
    burst = max(64 * 1024, int(rate_bps / 8 / 100))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "50ms"]


def nat_unavailable() -> str | None:
    """Why home routers (NAT) cannot be set up here, or None when they can."""
    return netns_unavailable() or (None if find_iptables() else "the `iptables` command is not installed")


@dataclass
class LabHost:
    index: int
    netns: str
    address: str  # where the node listens (its LAN address behind a router)
    bridge_end: str  # the veth end on the bridge: its rx is the node's tx and vice versa
    spec: LinkSpec | None = None
    router: str | None = None  # the home router's namespace, for a node behind NAT
    public_address: str = ""  # the address peers see (the router's WAN address behind NAT)

    @property
    def uplink(self) -> tuple[str, str]:
        """(namespace, device) whose egress is the link's uplink: the node's eth0, or its router's WAN."""
        return (self.router, "wan") if self.router else (self.netns, "eth0")


class NetnsLab:
    """A bridge and one namespace per node; :meth:`close` (or the context manager) removes them all."""

    def __init__(self) -> None:
        global _labs_made
        reason = netns_unavailable()
        if reason:
            raise RuntimeError(f"network-namespace links are unavailable: {reason}")
        remove_stale_labs()
        self.base = f"pw{os.getpid():x}x{_labs_made}"
        _labs_made += 1
        self.octet = _free_octet()
        self.bridge = f"{self.base}b"
        self.gateway = f"10.{self.octet}.0.1"
        self.hosts: dict[int, LabHost] = {}
        self.lan_octet: int | None = None  # 10.L.i.0/24: the LAN behind node i's router (picked on first use)
        _ip("link", "add", self.bridge, "type", "bridge")
        # With br_netfilter loaded (Docker hosts), bridged frames would cross iptables' FORWARD chain.
        _ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0", check=False)
        try:
            _ip("addr", "add", f"{self.gateway}/16", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def address(self, index: int) -> str:
        if not 0 <= index < 200 * 250:
            raise ValueError(f"node index {index} out of range for one lab")
        return f"10.{self.octet}.{index // 200 + 1}.{index % 200 + 10}"

    def add(self, index: int, spec: LinkSpec | None = None, nat: bool = False) -> LabHost:
        """The node's namespace (behind a home router of its own with ``nat``), created on first use (a
        restarted node keeps its address)."""
        if index in self.hosts:
            return self.hosts[index]
        ns, end, inner = f"{self.base}n{index}", f"{self.base}h{index}", f"{self.base}i{index}"
        if max(len(end), len(inner)) > 15:  # IFNAMSIZ
            raise RuntimeError(f"interface name {end!r} is too long for Linux (15 characters at most)")
        host = LabHost(index, ns, self.address(index), end, public_address=self.address(index))
        self.hosts[index] = host
        try:
            _ip("netns", "add", ns)
            _ip("link", "add", end, "type", "veth", "peer", "name", inner)
            _ip("link", "set", end, "master", self.bridge)
            _ip("link", "set", end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if nat:
                self._add_router(host, inner)
            else:
                _ip("link", "set", inner, "netns", ns)
                _ip("-n", ns, "link", "set", inner, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{host.address}/16", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
            self.shape(index, spec)
        except Exception:  # leave nothing half-built behind
            del self.hosts[index]
            _ip("link", "del", end, check=False)
            _kill_namespace(ns)
            if host.router:
                _kill_namespace(host.router)
            raise
        return host

    def _add_router(self, host: LabHost, wan: str) -> None:
        """Put ``host`` behind a router namespace: WAN on the bridge, a LAN link to the node, masquerade."""
        if not 0 <= host.index < 250:
            raise ValueError(f"node index {host.index} out of range for a node behind NAT (0..249)")
        iptables = find_iptables()
        if iptables is None:
            raise RuntimeError("NAT needs the `iptables` command (apt-get install iptables)")
        if self.lan_octet is None:
            self.lan_octet = _free_octet()
        router, lan = f"{self.base}r{host.index}", f"10.{self.lan_octet}.{host.index}"
        host.router, host.address = router, f"{lan}.2"
        _ip("netns", "add", router)
        _ip("link", "set", wan, "netns", router)
        _ip("-n", router, "link", "set", wan, "name", "wan")
        _ip("-n", router, "addr", "add", f"{host.public_address}/16", "dev", "wan")
        _ip("-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        for ns, dev in ((router, "lo"), (router, "wan"), (router, "lan"), (host.netns, "eth0")):
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", host.netns, "route", "add", "default", "via", f"{lan}.1")
        _netns_exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _netns_exec(router, iptables, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
        # Only the harness (root namespace) can reach the LAN: for /health and /metrics.
        _ip("route", "add", f"{lan}.0/24", "via", host.public_address, "dev", self.bridge)

    def shape(self, index: int, spec: LinkSpec | None) -> None:
        """(Re)shape a node's link to ``spec``'s rate in both directions; None or no rate: unshaped."""
        host = self.hosts[index]
        uplink_ns, uplink_dev = host.uplink
        for prefix, dev in ((["-n", uplink_ns], uplink_dev), ([], host.bridge_end)):
            subprocess.run(["tc", *prefix, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
            if spec is not None and spec.rate_bps:
                _tc(*prefix, "qdisc", "add", "dev", dev, "root", *tbf_args(spec.rate_bps))
        host.spec = spec

    def set_link_up(self, index: int, up: bool) -> None:
        """Cut (``up=False``) or restore node ``index``'s only link: a network partition of that node."""
        _ip("link", "set", self.hosts[index].bridge_end, "up" if up else "down")

    def exec_prefix(self, index: int) -> list[str]:
        """Prepend to a command to run it inside node ``index``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[index].netns]

    def link_bytes(self, index: int) -> dict[str, int]:
        """Bytes the node's link carried so far: {"sent": …, "received": …} (Ethernet frames)."""
        stats = Path("/sys/class/net") / self.hosts[index].bridge_end / "statistics"
        return {"sent": int((stats / "rx_bytes").read_text()), "received": int((stats / "tx_bytes").read_text())}

    def close(self) -> None:
        for host in list(self.hosts.values()):
            _kill_namespace(host.netns)
            if host.router:
                _kill_namespace(host.router)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)


def _netns_exec(ns: str, *command: str) -> None:
    out = subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` in {ns} failed: {(out.stderr or out.stdout).strip()}")


def _kill_namespace(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", ns, check=False)  # takes the veth pair with it


def remove_stale_labs() -> None:
    """Remove namespaces and bridges left by labs whose creating process is gone."""
    names = _ip("netns", "list", check=False).stdout.split()
    links = re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show", check=False).stdout, re.M)
    for name in names + links:
        match = _NAME.match(name)
        if not match or Path(f"/proc/{int(match.group(1), 16)}").exists():
            continue
        logger.info("removing %s, left by a dead process", name)
        if name in names:
            _kill_namespace(name)
        else:
            _ip("link", "del", name, check=False)


def _free_octet() -> int:
    """A second octet for 10.O.0.0/16 that no route of this machine uses yet."""
    routes = _ip("-4", "route", "show", check=False).stdout
    used = {int(m) for m in re.findall(r"\b10\.(\d+)\.", routes)}
    start = 64 + os.getpid() % 128
    for step in range(190):
        octet = 64 + (start - 64 + step) % 190
        if octet not in used:
            return octet
    raise RuntimeError("no free 10.x.0.0/16 subnet for a network-namespace lab")
