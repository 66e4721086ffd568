"""Home routers in the namespace lab (swarm/sim/netns.py ``nat=True``): a real masquerading NAT.

The node behind the router dials out (and is seen at the router's address); nobody on the bridge can
dial in, neither at the router's address nor at the node's LAN address; only the harness (root
namespace) reaches the LAN, for /health. The whole-swarm behaviour behind NAT is checked by the
DiLoCo sim test (tests/swarm/test_swarm_sim_diloco.py, one replica behind NAT).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from swarm.sim.iptables import fetch_iptables, find_iptables
from swarm.sim.netns import NetnsLab, netns_unavailable

NO_NETNS = netns_unavailable()
pytestmark = pytest.mark.skipif(NO_NETNS is not None, reason=f"needs network namespaces: {NO_NETNS}")

SERVE_ONCE = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    server.settimeout(30)
    print("READY", flush=True)
    conn, peer = server.accept()
    print(peer[0], flush=True)
""")
DIAL = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('connected')"


def _dial(prefix: list[str], address: str, port: int) -> str:
    out = subprocess.run([*prefix, sys.executable, "-c", DIAL, address, str(port)], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def _serve(lab: NetnsLab, index: int, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([*lab.exec_prefix(index), sys.executable, "-c", SERVE_ONCE, lab.hosts[index].address,
                             str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


@pytest.mark.timeout(120)
def test_a_home_router_lets_its_node_dial_out_and_nobody_dial_in():
    if find_iptables() is None:
        fetch_iptables()  # Debian's package unpacked into the cache, as `node sim --nat` does
    with NetnsLab() as lab:
        public, home = lab.add(0), lab.add(1, nat=True)
        assert home.router is not None and home.address != home.public_address

        server = _serve(lab, 0, 7001)
        try:
            assert _dial(lab.exec_prefix(1), public.address, 7001) == "connected"  # outbound works
            assert server.communicate(timeout=30)[0].strip() == home.public_address  # seen at the router's address
        finally:
            server.kill()

        server = _serve(lab, 1, 7002)
        try:
            assert "Connection refused" in _dial(lab.exec_prefix(0), home.public_address, 7002)  # no port forwarded
            assert "unreachable" in _dial(lab.exec_prefix(0), home.address, 7002)  # no route to the LAN
            assert _dial([], home.address, 7002) == "connected"  # the harness reaches /health this way
        finally:
            server.kill()
            server.wait()
