"""The ``iptables`` command for the lab's home routers (swarm/sim/netns.py, ``node sim --nat``).

:func:`find_iptables` returns ``iptables`` from ``PATH`` (``apt-get install iptables``), else a copy
unpacked earlier into the cache directory (``$PROTOSWARM_CACHE_DIR``, else ``~/.cache/protoswarm``).
:func:`fetch_iptables` makes that copy on a Debian machine without the package: it downloads Debian's
``iptables`` and the libraries it needs with ``apt-get download``, unpacks them with ``dpkg-deb -x``
(no package scripts run, nothing is installed system-wide), and writes a small wrapper that runs the
nftables flavour (``xtables-nft-multi``) against the unpacked libraries. ``node sim --nat`` says when
it does this. Both return the reason when there is no ``iptables`` to be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Debian's iptables and the shared libraries it links (bookworm), whichever of them are missing here.
PACKAGES = ("iptables", "libip4tc2", "libip6tc2", "libxtables12", "libnftnl11", "libnetfilter-conntrack3",
            "libnfnetlink0", "libmnl0")


def _cache_root() -> Path:
    root = os.environ.get("PROTOSWARM_CACHE_DIR") or Path.home() / ".cache" / "protoswarm"
    return Path(root) / "debian-iptables"


def _wrapper() -> Path:
    return _cache_root() / "bin" / "iptables"


def find_iptables() -> str | None:
    """The ``iptables`` to run: on PATH, else the unpacked copy; None when there is neither."""
    on_path = shutil.which("iptables")
    if on_path:
        return on_path
    wrapper = _wrapper()
    return str(wrapper) if wrapper.is_file() and os.access(wrapper, os.X_OK) else None


def fetch_iptables() -> str:
    """Unpack Debian's iptables into the cache; returns the wrapper's path, raises RuntimeError why not."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"iptables is not installed and `{tool}` is missing to fetch it "
                               "(install iptables: the lab's home routers masquerade with it)")
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            got = subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError("`apt-get download iptables` took over 5 minutes") from exc
        debs = sorted(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not any(d.name.startswith("iptables_") for d in debs):
            tail = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"cannot fetch Debian's iptables (`apt-get download`: {tail[0]}); install iptables")
        unpacked = Path(tmp) / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, timeout=300)
        target = root / "root"
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    libs = next(iter(sorted(target.glob("usr/lib/*-linux-gnu"))), target / "usr/lib")
    multi = target / "usr/sbin/xtables-nft-multi"
    if not multi.is_file():
        raise RuntimeError(f"Debian's iptables package has no {multi.relative_to(target)}")
    wrapper = _wrapper()
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    tmp_wrapper = wrapper.with_suffix(".tmp")
    tmp_wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}" XTABLES_LIBDIR="{libs}/xtables" '
                           f'exec "{multi}" iptables "$@"\n')
    tmp_wrapper.chmod(0o755)
    os.replace(tmp_wrapper, wrapper)  # atomic: never half a wrapper
    return str(wrapper)
