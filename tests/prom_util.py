"""Debian's Prometheus server and promtool for the tests, without installing a system service.

:func:`prometheus_tools` finds ``prometheus`` and ``promtool`` on ``PATH`` (``apt-get install
prometheus`` puts them there); otherwise it downloads Debian's ``prometheus`` package with
``apt-get download`` and unpacks only its binaries with ``dpkg-deb -x`` into a cache directory
(``$PROTOSWARM_CACHE_DIR``, else ``~/.cache/protoswarm``). Unpacking does not run the package's
scripts, so it needs no root and starts no service. When neither works it returns the reason, and
the tests skip with it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "prometheus"  # Debian's package: the server and promtool (static Go binaries)


@dataclass(frozen=True)
class PromTools:
    prometheus: Path
    promtool: Path


def _cache_dir() -> Path:
    root = os.environ.get("PROTOSWARM_CACHE_DIR") or Path.home() / ".cache" / "protoswarm"
    return Path(root) / "debian-prometheus"


@functools.cache
def prometheus_tools() -> PromTools | str:
    """The two binaries, or a sentence saying why they are not available."""
    on_path = shutil.which("prometheus"), shutil.which("promtool")
    if all(on_path):
        return PromTools(Path(on_path[0]), Path(on_path[1]))
    root = _cache_dir()
    tools = PromTools(root / "usr/bin/prometheus", root / "usr/bin/promtool")
    if tools.prometheus.is_file() and tools.promtool.is_file():
        return tools
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"Debian's {PACKAGE} package is not installed and `{tool}` is missing to fetch it"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            got = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired:
            return f"`apt-get download {PACKAGE}` took over 5 minutes"
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if got.returncode != 0 or not debs:
            tail = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"cannot fetch Debian's {PACKAGE} package (`apt-get download {PACKAGE}`: {tail[0]})"
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=300)
        for name in ("prometheus", "promtool"):
            (root / "usr/bin").mkdir(parents=True, exist_ok=True)
            os.replace(unpacked / "usr/bin" / name, root / "usr/bin" / name)  # atomic: never half a binary
    if not (tools.prometheus.is_file() and tools.promtool.is_file()):
        return f"Debian's {PACKAGE} package has no usr/bin/prometheus and usr/bin/promtool"
    return tools


def promtool_check_exprs(promtool: Path, exprs: dict[str, str], workdir: Path) -> subprocess.CompletedProcess:
    """Parse PromQL expressions with ``promtool check rules`` (each one a recording rule; JSON is YAML)."""
    rules = {"groups": [{"name": "exprs", "rules": [
        {"record": f"check:expr_{i}", "expr": expr, "labels": {"source": name[:200]}}
        for i, (name, expr) in enumerate(exprs.items())
    ]}]}
    path = workdir / "exprs.rules.yml"
    path.write_text(json.dumps(rules, indent=1))
    return subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


class PromServer:
    """A Prometheus server on 127.0.0.1 with its own data directory; a context manager."""

    def __init__(self, binary: Path, config: Path, workdir: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        self._args = [
            str(binary), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=info",
        ]
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> PromServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within 60 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns ``data`` or raises with Prometheus's error."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant PromQL query's result vector."""
        return self.api("query", query=expr)["result"]
