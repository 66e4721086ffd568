"""Build the images and bring docker/compose.yaml up for real with podman; print one JSON line.

Run through docker/smoke.sh (as root). What it does, in order:
1. a local base image when none is given: Debian bookworm with python3 from Debian's packages
   (``debootstrap --variant=minbase``, then ``podman import``), the host's extra CA certificates added so
   pip works behind a TLS-inspecting egress; cached as localhost/protoswarm-base:bookworm;
2. a Prometheus image from Debian's ``prometheus`` package on that base, when prom/prometheus cannot be
   pulled (cached); Grafana's image is used if present or pullable, and otherwise the Grafana check is
   reported as skipped with the reason (Grafana is not packaged by Debian or PyPI);
3. the CPU image from docker/Dockerfile (timed), torch from a local wheel directory when one holds the
   pinned CPU wheel, else from the official CPU index;
4. ``podman-compose up`` of the bootstrap, the joiners and Prometheus (and Grafana), with a shorter
   checkpoint interval (an override file) and one torch thread per node;
5. waits until every node is online and training, Prometheus has every node ``up``, the dashboard's
   "Nodes online" query answers, the loss fell, and the first joiner has a checkpoint on its volume;
6. kills that joiner with SIGKILL, starts it again and waits until it resumed from the checkpoint with
   the same identity (both on its /data volume);
7. tears everything down (containers, network, named and anonymous volumes) and checks nothing is left.

Subprocess output goes to the log directory; progress goes to stderr; the last stdout line is the JSON.
Exit status: 0 all checks held, 1 a check failed, 2 bad arguments, 77 skipped (the reason in "skipped").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "protoswarm.json"
PROJECT = "protoswarm-smoke"
NODE_SERVICES = ("bootstrap", "joiner")
BASE_TAG = "localhost/protoswarm-base:bookworm"
PROMETHEUS_TAG = "localhost/protoswarm-prometheus:debian"
IMAGE_TAG = "localhost/protoswarm:smoke"
CUDA_TAG = "localhost/protoswarm:smoke-cuda"
SKIPPED = 77
STARTED = time.monotonic()

PROMETHEUS_CONTAINERFILE = """\
FROM {base}
RUN apt-get update \\
    && apt-get install -y --no-install-recommends prometheus \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /prometheus \\
    && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


class Skip(Exception):
    """The smoke cannot run here; the message says why."""


class Failed(Exception):
    """A step failed; the message says which and why."""


def say(msg: str) -> None:
    print(f"[smoke {time.monotonic() - STARTED:6.0f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="docker/smoke.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--joiners", type=int, default=2, help="joining nodes besides the bootstrap (default 2)")
    p.add_argument("--base", default=None,
                   help=f"base image for the node images (default {BASE_TAG}, made with debootstrap when absent)")
    p.add_argument("--rebuild-base", action="store_true", help="make the local base and Prometheus images again")
    p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    p.add_argument("--torch-wheels", default=None,
                   help="directory holding the pinned CPU torch wheel (default: pip's find-links, if one holds it)")
    p.add_argument("--prometheus-image", default=None,
                   help=f"Prometheus image (default {PROMETHEUS_TAG}, built from Debian's package when absent)")
    p.add_argument("--grafana-image", default="docker.io/grafana/grafana-oss:11.4.0",
                   help="Grafana image, used when present or pullable (default: compose.yaml's)")
    p.add_argument("--no-cache", action="store_true", help="build the node image without podman's layer cache")
    p.add_argument("--cuda", action="store_true", help="also build docker/Dockerfile.cuda (several GB)")
    p.add_argument("--cuda-index", default="https://pypi.org/simple",
                   help="TORCH_INDEX for the CUDA image (default PyPI, whose Linux torch is a CUDA build)")
    p.add_argument("--checkpoint-every", type=int, default=30,
                   help="train.checkpoint_every for the nodes, so the kill finds a checkpoint soon (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each wait (default 600)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "protoswarm-smoke", help="where the base's root file system and the logs go")
    p.add_argument("--keep", action="store_true", help="leave the stack running at the end (no teardown)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and the compose files (podman-compose config) and print the "
                        "plan; needs neither root nor podman")
    args = p.parse_args(argv)
    for name in ("joiners", "checkpoint_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    return args


# --- helpers ----------------------------------------------------------------------------------------

class Runner:
    """Runs commands with CONTAINERS_CONF set, their output appended to one log file."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log, self.env = log, env

    def __call__(self, argv: list[str], *, check: bool = True, capture: bool = False, timeout: float = 1800,
                 stdin: str | None = None) -> subprocess.CompletedProcess:
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            try:
                done = subprocess.run(argv, env=self.env, text=True, timeout=timeout, input=stdin,
                                      stdout=subprocess.PIPE if capture else log, stderr=log)
            except subprocess.TimeoutExpired as exc:
                raise Failed(f"`{' '.join(argv[:3])} …` ran past {timeout:.0f} s (log: {self.log})") from exc
        if check and done.returncode != 0:
            raise Failed(f"`{' '.join(argv[:4])} …` exited {done.returncode} (log: {self.log})")
        return done

    def out(self, argv: list[str], **kw: Any) -> str:
        return self(argv, capture=True, **kw).stdout.strip()


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    """Poll ``probe`` until it returns something truthy; Failed after ``timeout`` seconds."""
    deadline, last_said, last = time.monotonic() + timeout, time.monotonic(), None
    while True:
        try:
            last = probe()
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            last = None
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = "not yet"
        if last:
            return last
        if time.monotonic() >= deadline:
            raise Failed(f"{what}: not within {timeout:.0f} s ({reason})")
        if time.monotonic() - last_said >= 15:
            say(f"waiting: {what}")
            last_said = time.monotonic()
        time.sleep(every)


def http_json(url: str, data: dict | None = None, timeout: float = 5.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_pin() -> str:
    m = re.search(r"\btorch==([0-9][0-9.]*)", (DOCKER / "Dockerfile").read_text())
    if m is None:
        raise Failed("docker/Dockerfile pins no torch==VERSION")
    return m.group(1)


def find_torch_wheels(given: str | None) -> Path | None:
    """A directory holding the pinned CPU wheel: --torch-wheels, else one of pip's find-links."""
    pattern = f"torch-{torch_pin()}+cpu-*.whl"
    if given is not None:
        path = Path(given)
        if not any(path.glob(pattern)):
            raise Failed(f"--torch-wheels {given}: no {pattern} there")
        return path
    candidates = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        found = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                               timeout=60).stdout
        candidates += re.findall(r"find-links='([^']+)'", found)
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        for one in c.split():
            path = Path(one.removeprefix("file://"))
            if path.is_dir() and any(path.glob(pattern)):
                return path
    return None


def podman_compose() -> str | None:
    beside = Path(sys.executable).parent / "podman-compose"
    return str(beside) if beside.is_file() else shutil.which("podman-compose")


def git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=30).stdout.strip() != ""
        return {"commit": head or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def override_compose(checkpoint_every: int) -> dict[str, Any]:
    """The smoke's compose override: the bootstrap's own command plus a shorter checkpoint interval, a
    parameter of the run that the joiners take from the swarm (they may not set it themselves)."""
    import yaml  # podman-compose's own dependency, so present wherever it is

    command = yaml.safe_load(COMPOSE.read_text())["services"]["bootstrap"]["command"]
    return {"services": {"bootstrap": {
        "command": [*command, "--set", f"train.checkpoint_every={checkpoint_every}"]}}}


def dashboard_query(title: str) -> str:
    """The first query of the dashboard panel titled ``title``, with its variables at the compose job."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel.get("title") == title:
            expr = panel["targets"][0]["expr"]
            return expr.replace("$job", "protoswarm").replace("$instance", ".*")
    raise Failed(f"no panel {title!r} in {DASHBOARD.name}")


# --- the smoke ----------------------------------------------------------------------------------------

class Images:
    """The base, Prometheus and node images (and Grafana's, when it can be had)."""

    def __init__(self, args: argparse.Namespace, run: Runner, logdir: Path, result: dict[str, Any]) -> None:
        self.args, self.run, self.logdir, self.result = args, run, logdir, result

    def exists(self, image: str) -> bool:
        return self.run(["podman", "image", "exists", image], check=False).returncode == 0

    def base_image(self) -> str:
        if self.args.base:
            if not self.exists(self.args.base):
                self.run(["podman", "pull", self.args.base], timeout=900)
            return self.args.base
        if self.exists(BASE_TAG) and not self.args.rebuild_base:
            say(f"base image {BASE_TAG}: cached")
            return BASE_TAG
        if shutil.which("debootstrap") is None:
            raise Skip("no base image: pass --base IMAGE, or install debootstrap to make one")
        rootfs = self.args.cache / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        say(f"making the base image with debootstrap from {self.args.mirror} (a few minutes)")
        started = time.monotonic()
        self.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                  "bookworm", str(rootfs), self.args.mirror], timeout=1800)
        extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for crt in extra:  # an egress that inspects TLS signs with these: pip in the build must trust them
            shutil.copy(crt, rootfs / "usr/local/share/ca-certificates" / crt.name)
        if extra:
            self.run(["chroot", str(rootfs), "update-ca-certificates"])
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        with (self.logdir / "commands.log").open("a") as log:
            imported = subprocess.run(
                ["podman", "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                 "--change", 'CMD ["/bin/bash"]', "-", BASE_TAG],
                stdin=tar.stdout, stdout=log, stderr=log, env=self.run.env, timeout=900)
        tar.wait()
        if imported.returncode or tar.returncode:
            raise Failed(f"podman import of the base failed (log: {self.run.log})")
        shutil.rmtree(rootfs, ignore_errors=True)
        self.result["base_made_s"] = round(time.monotonic() - started, 1)
        return BASE_TAG

    def prometheus_image(self, base: str) -> str:
        if self.args.prometheus_image:
            return self.args.prometheus_image
        if self.exists(PROMETHEUS_TAG) and not self.args.rebuild_base:
            return PROMETHEUS_TAG
        say("building a Prometheus image from Debian's package")
        self.run(["podman", "build", "--format", "docker", "-t", PROMETHEUS_TAG, "-f", "-", str(self.logdir)],
                 stdin=PROMETHEUS_CONTAINERFILE.format(base=base), timeout=1800)
        return PROMETHEUS_TAG

    def grafana_image(self) -> str | None:
        image = self.args.grafana_image
        if self.exists(image):
            return image
        pulled = self.run(["podman", "pull", image], check=False, capture=True, timeout=300)
        if pulled.returncode == 0:
            return image
        tail = (self.run.log.read_text().strip().splitlines() or ["?"])[-1]
        self.result["grafana_skipped"] = (f"{image} is not present and cannot be pulled ({tail[-200:]}); "
                                          "Grafana is packaged neither by Debian nor by PyPI")
        return None

    def build(self, dockerfile: str, tag: str, build_args: dict[str, str], volumes: list[str]) -> float:
        argv = ["podman", "build", "--format", "docker", "-f", str(DOCKER / dockerfile), "-t", tag]
        if self.args.no_cache:
            argv.append("--no-cache")
        for k, v in build_args.items():
            argv += ["--build-arg", f"{k}={v}"]
        for v in volumes:
            argv += ["-v", v]
        started = time.monotonic()
        self.run([*argv, str(REPO)], timeout=3600)
        return round(time.monotonic() - started, 1)

    def image_bytes(self, tag: str) -> int:
        return int(self.run.out(["podman", "image", "inspect", "--format", "{{.Size}}", tag]))

    # the stack

    def make(self) -> tuple[str, str | None]:
        """Every image the stack needs: (the Prometheus image, the Grafana image or None)."""
        args = self.args
        base = self.base_image()
        prometheus = self.prometheus_image(base)
        grafana = self.grafana_image()
        wheels = find_torch_wheels(args.torch_wheels)
        build_args = {"BASE_IMAGE": base}
        volumes = []
        if wheels is not None:  # the pinned CPU wheel from disk, its dependencies from PyPI
            build_args.update(TORCH_INDEX="https://pypi.org/simple", TORCH_FIND_LINKS="/wheels")
            volumes.append(f"{wheels}:/wheels:ro")
        self.result["torch_source"] = str(wheels) if wheels else "https://download.pytorch.org/whl/cpu"
        say(f"building {IMAGE_TAG} from docker/Dockerfile")
        self.result["build_s"] = self.build("Dockerfile", IMAGE_TAG, build_args, volumes)
        self.result["image_bytes"] = self.image_bytes(IMAGE_TAG)
        say(f"built in {self.result['build_s']} s, {self.result['image_bytes'] / 2**30:.2f} GiB")
        if args.cuda:
            say(f"building {CUDA_TAG} from docker/Dockerfile.cuda (torch from {args.cuda_index})")
            self.result["cuda_build_s"] = self.build("Dockerfile.cuda", CUDA_TAG,
                                                     {"BASE_IMAGE": base, "TORCH_INDEX": args.cuda_index}, [])
            self.result["cuda_image_bytes"] = self.image_bytes(CUDA_TAG)
            probe = ("import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())")
            torch_v, cuda_v, visible = self.run.out(["podman", "run", "--rm", "--entrypoint", "python", CUDA_TAG,
                                                     "-c", probe]).split()[-3:]
            self.result.update(cuda_torch=torch_v, cuda_runtime=cuda_v, cuda_gpu_visible=visible == "True")
        return prometheus, grafana


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.result: dict[str, Any] = {"joiners": args.joiners, **git_commit()}
        args.cache.mkdir(parents=True, exist_ok=True)
        self.logdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
        self.result["log_dir"] = str(self.logdir)
        env = dict(os.environ)
        if "CONTAINERS_CONF" not in env:
            env["CONTAINERS_CONF"] = str(self._containers_conf())
        self.run = Runner(self.logdir / "commands.log", env)
        self.compose_cmd = [podman_compose() or "podman-compose", "-p", PROJECT, "-f", str(COMPOSE),
                            "-f", str(self.logdir / "compose.smoke.yaml")]
        self.ports = {"BOOTSTRAP_METRICS_PORT": free_port(), "PROMETHEUS_PORT": free_port(),
                      "GRAFANA_PORT": free_port()}
        self.anonymous_volumes: set[str] = set()
        self.images = Images(args, self.run, self.logdir, self.result)

    def _containers_conf(self) -> Path:
        """No default ulimits (setting RLIMIT_NOFILE is refused in some sandboxes) and runc when installed
        (crun fails on hybrid cgroups); CONTAINERS_CONF from the caller wins over this file."""
        conf = self.args.cache / "containers.conf"
        text = "[containers]\ndefault_ulimits = []\n"
        if shutil.which("runc"):
            text += '\n[engine]\nruntime = "runc"\n'
        conf.write_text(text)
        return conf

    # images

    def compose(self, *argv: str, timeout: float = 900) -> None:
        self.run(self.compose_cmd + list(argv), timeout=timeout)

    def containers(self) -> list[dict[str, Any]]:
        out = self.run.out(["podman", "ps", "-a", "--format", "json",
                            "--filter", f"label=io.podman.compose.project={PROJECT}"])
        return json.loads(out or "[]")

    def node_containers(self) -> list[str]:
        names = sorted(n for c in self.containers() for n in c["Names"]
                       if c.get("Labels", {}).get("io.podman.compose.service") in NODE_SERVICES)
        return sorted(names, key=lambda n: ("joiner" in n, n))  # the bootstrap first

    def ip(self, name: str) -> str:
        return self.run.out(["podman", "inspect", "--format",
                             "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name]).split()[0]

    def not_restarting(self, names: list[str]) -> None:
        """Failed at once when a node's container has been restarted: a node that exits at start (a bad
        flag, a refused setting) is restarted forever by the restart policy and never comes online."""
        for name in names:
            if int(self.run.out(["podman", "inspect", "--format", "{{.RestartCount}}", name]) or 0) > 0:
                logs = subprocess.run(["podman", "logs", "--tail", "3", name], env=self.run.env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60).stdout
                raise Failed(f"{name} was restarted: it exited; its last lines: {logs.strip()[-400:]!r}")

    def health(self, name: str) -> dict[str, Any]:
        return http_json(f"http://{self.ip(name)}:9464/health", timeout=4)

    def prometheus(self, path: str, **params: Any) -> Any:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}{path}?{urllib.parse.urlencode(params)}"
        out = http_json(url)
        if out.get("status") != "success":
            raise ValueError(f"prometheus {path}: {out}")
        return out["data"]

    def targets_up(self) -> int | None:
        """The nodes Prometheus scrapes successfully, once that is every node (and no stale target)."""
        active = [t for t in self.prometheus("/api/v1/targets")["activeTargets"]
                  if t["labels"].get("job") == "protoswarm"]
        up = sum(t["health"] == "up" for t in active)
        return up if up == len(active) == 1 + self.args.joiners else None

    def up(self, grafana: str | None) -> None:
        import yaml

        (self.logdir / "compose.smoke.yaml").write_text(yaml.safe_dump(override_compose(self.args.checkpoint_every)))
        env = self.run.env
        env.update({k: str(v) for k, v in self.ports.items()})
        env.update(PROTOSWARM_IMAGE=IMAGE_TAG, JOINERS=str(self.args.joiners), NODE_THREADS=str(self.args.threads),
                   RUN_ID=f"smoke-{int(time.time())}")
        if grafana:
            env["GRAFANA_IMAGE"] = grafana
        services = ["bootstrap", "joiner", "prometheus"] + (["grafana"] if grafana else [])
        say(f"podman-compose up: {', '.join(services)} ({self.args.joiners} joiners)")
        self.compose("up", "-d", *services)

    def check_swarm(self) -> None:
        n, timeout = 1 + self.args.joiners, self.args.timeout
        self.t_up = time.time()

        def online() -> list[dict[str, Any]] | None:
            names = self.node_containers()
            if len(names) != n:
                return None
            self.not_restarting(names)
            healths = [self.health(name) for name in names]
            ready = [h for h in healths if h.get("state") == "online" and (h.get("progress") or 0) > 0]
            return healths if len(ready) == n else None

        say(f"waiting for {n} nodes online and training")
        healths = wait_for(f"{n} nodes online and training", online, timeout)
        self.result["nodes_online"] = len(healths)
        self.result["peer_ids"] = [h["peer_id"] for h in healths]

        self.result["targets_up"] = wait_for(f"Prometheus: {n} targets up", self.targets_up, timeout)
        expr = dashboard_query("Nodes online")

        def panel() -> float | None:
            got = self.prometheus("/api/v1/query", query=expr)["result"]
            value = float(got[0]["value"][1]) if got else 0.0
            return value if value == n else None

        self.result["dashboard_nodes_online"] = int(wait_for("the dashboard's Nodes online query", panel, timeout))

    def check_loss(self) -> None:
        """Loss falling: the nodes' mean training loss in Prometheus, its first samples against its last."""
        def series() -> list[float] | None:
            data = self.prometheus("/api/v1/query_range", query='avg(protoswarm_train_loss{job="protoswarm"})',
                                   start=self.t_up - 120, end=time.time(), step=5)["result"]
            values = [float(v) for _, v in data[0]["values"]] if data else []
            values = [v for v in values if math.isfinite(v)]  # NaN: the gauge before a node's first step
            return values if len(values) >= 8 else None

        values = wait_for("8 loss samples in Prometheus", series, self.args.timeout, every=5)
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        self.result.update(loss_first=round(first, 4), loss_last=round(last, 4), loss_samples=len(values),
                           loss_falling=last < first)

    def check_grafana(self) -> None:
        base = f"http://127.0.0.1:{self.ports['GRAFANA_PORT']}"
        wait_for("Grafana's API", lambda: http_json(f"{base}/api/health").get("database") == "ok", self.args.timeout)
        dash = http_json(f"{base}/api/dashboards/uid/protoswarm-overview")["dashboard"]
        panel = next(p for p in dash["panels"] if p.get("title") == "Nodes online")
        query = {"from": "now-5m", "to": "now", "queries": [{
            "refId": "A", "datasource": panel["datasource"], "expr": dashboard_query("Nodes online"),
            "instant": True, "range": False}]}
        frames = http_json(f"{base}/api/ds/query", query)["results"]["A"]["frames"]
        values = frames[0]["data"]["values"][-1] if frames else []
        self.result["grafana_nodes_online"] = int(values[-1]) if values else None

    def kill_and_resume(self) -> None:
        """SIGKILL the first joiner once it has a checkpoint, start it again, and see it resume."""
        victim = next(n for n in self.node_containers() if "joiner" in n)
        saved = wait_for(f"a checkpoint on {victim}'s volume",
                         lambda: self.health(victim).get("saved_step"), self.args.timeout)
        before = self.health(victim)
        self.result["node_uid"] = int(self.run.out(["podman", "exec", victim, "id", "-u"]))
        self.result["data_is_a_volume"] = "/data" in self.run.out(
            ["podman", "inspect", "--format", "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Destination}} {{end}}{{end}}",
             victim]).split()
        started_at = self.run.out(["podman", "inspect", "--format", "{{.State.StartedAt}}", victim])
        say(f"SIGKILL {victim} (checkpoint at step {saved}, progress {before['progress']})")
        self.run(["podman", "kill", "--signal", "KILL", victim])

        def state() -> str:
            return self.run.out(["podman", "inspect", "--format", "{{.State.Status}} {{.State.StartedAt}}", victim])

        wait_for(f"{victim} to stop or be restarted", lambda: state() != f"running {started_at}", 60, every=0.5)
        if state().startswith("running"):
            self.result["restarted_by"] = "the restart policy"
        else:
            self.run(["podman", "start", victim])
            self.result["restarted_by"] = "podman start"

        def resumed() -> dict[str, Any] | None:
            h = self.health(victim)
            return h if h.get("state") == "online" and h.get("resumed_from") is not None else None

        after = wait_for(f"{victim} online again", resumed, self.args.timeout)
        trained = wait_for(f"{victim} training after the restart",
                           lambda: self.health(victim).get("progress", 0) > after["resumed_from"], self.args.timeout)
        self.result.update(killed=victim, saved_step_before_kill=saved, resumed_from=after["resumed_from"],
                           same_identity=after["peer_id"] == before["peer_id"],
                           resume_ok=bool(trained) and after["resumed_from"] >= saved
                           and after["peer_id"] == before["peer_id"])

    def teardown(self) -> None:
        started = time.monotonic()
        for c in self.containers():
            mounts = self.run.out(["podman", "inspect", "--format",
                                   "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}", c["Id"]])
            self.anonymous_volumes |= {v for v in mounts.split() if re.fullmatch(r"[0-9a-f]{64}", v)}
        say("podman-compose down")
        ok = self.run([*self.compose_cmd, "down", "-v", "-t", "30"], check=False, timeout=300).returncode == 0
        for v in sorted(self.anonymous_volumes):
            self.run(["podman", "volume", "rm", "-f", v], check=False)
        label = f"label=io.podman.compose.project={PROJECT}"
        left = {
            "containers": self.run.out(["podman", "ps", "-a", "-q", "--filter", label]).split(),
            "volumes": self.run.out(["podman", "volume", "ls", "-q", "--filter", label]).split()
            + [v for v in self.anonymous_volumes if self.run(["podman", "volume", "exists", v], check=False)
               .returncode == 0],
            "networks": self.run.out(["podman", "network", "ls", "-q", "--filter", label]).split(),
        }
        self.result["teardown_s"] = round(time.monotonic() - started, 1)
        self.result["teardown_left"] = {k: v for k, v in left.items() if v}
        self.result["teardown_clean"] = ok and not any(left.values())

    def main(self) -> None:
        args = self.args
        prometheus, grafana = self.images.make()
        self.run.env["PROMETHEUS_IMAGE"] = prometheus
        try:
            self.up(grafana)
            self.check_swarm()
            self.check_loss()
            if grafana:
                self.check_grafana()
            self.kill_and_resume()
            self.result["targets_up_after_restart"] = wait_for(
                "Prometheus: every target up after the restart", self.targets_up, args.timeout)
        finally:
            if not args.keep:
                self.teardown()


def ok(result: dict[str, Any], joiners: int) -> bool:
    n = 1 + joiners
    return (result.get("nodes_online") == n and result.get("targets_up") == n and result.get("loss_falling") is True
            and result.get("resume_ok") is True and result.get("teardown_clean") is True
            and result.get("node_uid") not in (None, 0) and result.get("data_is_a_volume") is True
            and result.get("grafana_nodes_online", n) == n)


def dry_run(args: argparse.Namespace) -> int:
    """The cheap part: the arguments, the override and `podman-compose config` of both files."""
    pc = podman_compose()
    if pc is None:
        print(json.dumps({"skipped": "podman-compose is not installed (pip install podman-compose)"}))
        return SKIPPED
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "compose.smoke.yaml"
        override.write_text(yaml.safe_dump(override_compose(args.checkpoint_every)))
        env = dict(os.environ, JOINERS=str(args.joiners), NODE_THREADS=str(args.threads),
                   PROTOSWARM_IMAGE=IMAGE_TAG, PROMETHEUS_IMAGE=args.prometheus_image or PROMETHEUS_TAG)
        done = subprocess.run([pc, "--dry-run", "-p", PROJECT, "-f", str(COMPOSE), "-f", str(override), "config"],
                              capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        print(json.dumps({"dry_run": True, "compose_valid": False}))
        return 1
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    print(json.dumps({
        "dry_run": True, "compose_valid": True, "services": sorted(services),
        "joiner_replicas": int(services["joiner"]["deploy"]["replicas"]),
        "commands": {name: services[name]["command"] for name in NODE_SERVICES},
        "images": {name: svc.get("image") for name, svc in services.items()},
        "torch_wheels": str(find_torch_wheels(args.torch_wheels) or ""),
    }))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    why = ("not root (rootless podman cannot reach the containers' addresses this script polls)"
           if os.geteuid() != 0 else "podman is not installed" if shutil.which("podman") is None
           else "podman-compose is not installed (pip install podman-compose)" if podman_compose() is None
           else None)
    if why is not None:
        print(json.dumps({"skipped": why}))
        return SKIPPED
    smoke = Smoke(args)
    code = 1
    try:
        smoke.main()
        code = 0 if ok(smoke.result, args.joiners) else 1
    except Skip as exc:
        smoke.result["skipped"] = str(exc)
        code = SKIPPED
    except (Failed, OSError, ValueError, KeyError) as exc:
        smoke.result["error"] = f"{type(exc).__name__}: {exc}"
        say(f"FAILED: {smoke.result['error']}")
    smoke.result["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    smoke.result["ok"] = code == 0
    print(json.dumps(smoke.result))
    return code


if __name__ == "__main__":
    sys.exit(main())
