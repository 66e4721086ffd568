"""docker/: the two Dockerfiles, compose.yaml, prometheus.yml and .dockerignore, checked without a Docker engine.

No image is built and no container runs here. What is checked, with real tools where there are some:
- hadolint lints both Dockerfiles (and flags a root USER appended to one, so it is really linting);
- check-jsonschema validates compose.yaml against the compose-spec schema (and refuses broken copies);
- promtool checks prometheus.yml (and refuses a broken copy);
- the ENTRYPOINT is a console script of this package, and the entrypoint plus every node service's
  ``command:`` parses with ``node``'s own argument parser, so a misspelled flag fails here;
- the HEALTHCHECK command is run against a real MetricsServer: healthy while alive, unhealthy when the
  node is offline or nothing answers;
- non-root USER after the installs, /data as WORKDIR, HOME and VOLUME, ports, the torch pin;
- the compose wiring: mounted files, build context (through .dockerignore), scrape targets, Grafana's
  data source and home dashboard.
Tools that are missing make their tests skip with the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from prom_util import prometheus_tools

from node.cli import build_parser
from node.config import SwarmConfig
from node.metrics import MetricsServer, NodeMetrics

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_YML = DOCKER / "prometheus.yml"
GRAFANA_DATASOURCE = DOCKER / "grafana/provisioning/datasources/prometheus.yaml"
GRAFANA_DASHBOARD_PROVIDER = DOCKER / "grafana/provisioning/dashboards/protoswarm.yaml"
METRICS_PORT = SwarmConfig().metrics_port
P2P_PORT = 31337
PROMETHEUS_PORT = 9090  # prom/prometheus listens on 9090 unless told otherwise
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# --- helpers ---------------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A console tool from this venv (next to the interpreter), else from PATH; skip when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` is not installed (pip install -e '.[dev]' provides it)")
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # blank and comment lines, also inside a continuation (Docker drops those too)
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends in a line continuation"
    return out


def only(path: Path, keyword: str) -> list[tuple[int, str]]:
    return [(i, rest) for i, (kw, rest) in enumerate(instructions(path)) if kw == keyword]


def exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def entrypoint(path: Path) -> list[str]:
    found = only(path, "ENTRYPOINT")
    assert len(found) == 1, f"{path.name}: exactly one ENTRYPOINT"
    return exec_form(found[0][1])  # the JSON (exec) form: node gets the signals, not a shell


def healthcheck_argv(path: Path) -> list[str]:
    found = only(path, "HEALTHCHECK")
    assert len(found) == 1, f"{path.name}: exactly one HEALTHCHECK"
    options, sep, command = found[0][1].partition("CMD ")
    assert sep and options.split() and all(o.startswith("--") for o in options.split()), found[0][1]
    return exec_form(command)


def arg_default(path: Path, value: str) -> str:
    """``value``, or the default of the build argument it names (``${NAME}``) as the file declares it."""
    m = re.fullmatch(r"\$\{(\w+)\}", value)
    if m is None:
        return value
    defaults = [rest.split("=", 1)[1] for _, rest in only(path, "ARG") if rest.startswith(f"{m.group(1)}=")]
    assert len(defaults) == 1, f"{path.name}: build argument {m.group(1)} needs exactly one default"
    return defaults[0]


def env_vars(path: Path) -> dict[str, str]:
    out = {}
    for _, rest in only(path, "ENV"):
        for item in shlex.split(rest):
            key, sep, value = item.partition("=")
            assert sep, f"{path.name}: use ENV KEY=VALUE, got {item!r}"
            out[key] = value
    return out


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose(text: str | None = None) -> dict[str, Any]:
    """compose.yaml with every ${VAR:-default} at its default, as `docker compose` reads it with VAR unset."""
    text = COMPOSE.read_text() if text is None else text
    return yaml.safe_load(_COMPOSE_VAR.sub(lambda m: m.group(2) or "", text))


def node_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfiles: the protoswarm nodes."""
    return {name: svc for name, svc in doc["services"].items() if "build" in svc}


def dockerfile_of(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def bind_mounts(svc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(source, target, options) of the short-syntax volumes of a service."""
    for spec in svc.get("volumes", []):
        assert isinstance(spec, str), f"use the short volume syntax here, got {spec!r}"
        source, target, *opts = spec.split(":")
        yield source, target, ",".join(opts)


def start_args(argv: list[str]):
    """Parse `node start ARGS` with the package's own parser; a misspelled flag exits (SystemExit)."""
    return build_parser().parse_args(argv)


# --- hadolint ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    got = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stdout + got.stderr


def test_hadolint_flags_a_root_user(tmp_path: Path) -> None:
    """Negative control: the same Dockerfile ending as root must fail, so the linter is really linting."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILES[0].read_text() + "\nUSER root\n")
    got = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert got.returncode != 0 and "DL3002" in got.stdout, got.stdout + got.stderr


# --- compose-spec schema -----------------------------------------------------------------------------

def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_validates_against_compose_spec() -> None:
    got = _check_compose(COMPOSE)
    assert got.returncode == 0, got.stdout + got.stderr


def test_gpu_override_in_the_docs_validates(tmp_path: Path) -> None:
    """docs/docker.md's compose override (meant to live in docker/) is a valid compose file too."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs/docker.md").read_text(), flags=re.S)
    assert blocks, "docs/docker.md has no yaml block"
    for i, block in enumerate(blocks):
        path = tmp_path / f"override{i}.yaml"
        path.write_text(block)
        got = _check_compose(path)
        assert got.returncode == 0, got.stdout + got.stderr
        for name, svc in yaml.safe_load(block)["services"].items():
            if "build" in svc:
                assert dockerfile_of(svc) in DOCKERFILES, f"{name}: {dockerfile_of(svc)}"


@pytest.mark.parametrize("breakage", [
    ("ports", lambda doc: doc["services"]["bootstrap"].__setitem__("ports", 5)),
    ("top-level key", lambda doc: doc.__setitem__("servises", {})),
    ("service key", lambda doc: doc["services"]["joiner"].__setitem__("replicas", 2)),
], ids=lambda b: b[0])
def test_compose_schema_refuses_broken_copies(tmp_path: Path, breakage) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    breakage[1](doc)
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(doc))
    got = _check_compose(broken)
    assert got.returncode != 0, f"the schema accepted a compose file with a broken {breakage[0]}"


# --- the entrypoint and the commands -----------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_the_packaged_daemon(dockerfile: Path) -> None:
    argv = entrypoint(dockerfile)
    assert argv[:2] == ["node", "start"], argv
    target = PYPROJECT["project"]["scripts"].get(argv[0])
    assert target == "node.cli:main", f"`{argv[0]}` is not a [project.scripts] entry of node.cli:main"
    cmd = only(dockerfile, "CMD")
    assert len(cmd) == 1, f"{dockerfile.name}: one CMD (the default flags)"
    args = start_args([*argv[1:], *exec_form(cmd[0][1])])
    assert args.command == "start" and not args.join  # the bare image starts a new swarm
    assert args.host_maddrs == ["/ip4/0.0.0.0/tcp/31337"]  # on the EXPOSEd p2p port
    # The installed console script really runs that subcommand (help only: nothing starts).
    got = subprocess.run([tool(argv[0]), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "--join" in got.stdout, got.stdout + got.stderr


def test_cuda_image_defaults_to_the_gpu() -> None:
    args = start_args(entrypoint(DOCKER / "Dockerfile.cuda")[1:])
    assert args.device == "cuda"
    assert start_args([*entrypoint(DOCKER / "Dockerfile.cuda")[1:], "--device", "cuda:1"]).device == "cuda:1"


def test_a_misspelled_flag_fails_to_parse() -> None:
    """Control for the command checks below: the parser does refuse an unknown flag."""
    with pytest.raises(SystemExit):
        start_args(["start", "--jion", "http://bootstrap:9464"])


def test_compose_node_commands_parse() -> None:
    doc = compose()
    nodes = node_services(doc)
    assert {"bootstrap", "joiner"} <= set(nodes)
    parsed = {}
    for name, svc in nodes.items():
        command = svc.get("command", [])
        assert isinstance(command, list), f"{name}: use the exec (list) form for command:"
        argv = [*entrypoint(dockerfile_of(svc))[1:], *command]
        try:
            parsed[name] = start_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `node {shlex.join(argv)}` does not parse (argparse's message is above)")
    # The bootstrap creates the run; the joiners join it by the bootstrap's /health URL.
    assert not parsed["bootstrap"].join and parsed["bootstrap"].run_id
    assert parsed["joiner"].run_id in (None, parsed["bootstrap"].run_id)
    assert parsed["joiner"].join, "the joiners need a --join"
    for url in parsed["joiner"].join:
        u = urllib.parse.urlsplit(url)
        assert u.scheme == "http" and u.hostname in nodes and u.hostname != "joiner", url
        assert (u.port or 80) == (parsed[u.hostname].metrics_port or METRICS_PORT), url
    for name, args in parsed.items():
        for maddr in args.host_maddrs:
            m = re.fullmatch(r"/ip4/0\.0\.0\.0/tcp/(\d+)", maddr)
            assert m and int(m.group(1)) == P2P_PORT, f"{name}: listen on every interface at {P2P_PORT}: {maddr}"


# --- the HEALTHCHECK, run for real -------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_targets_health_on_the_metrics_port(dockerfile: Path) -> None:
    argv = healthcheck_argv(dockerfile)
    assert argv[0] == "python"  # the venv's, first on PATH; the slim image has no curl
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(argv))
    assert len(urls) == 1, urls
    url = urllib.parse.urlsplit(urls[0])
    assert url.path == "/health" and url.hostname == "127.0.0.1" and url.port == METRICS_PORT, urls[0]


def _healthcheck(argv: list[str], port: int) -> int:
    code = [a.replace(f":{METRICS_PORT}/", f":{port}/") for a in argv[1:]]
    return subprocess.run([sys.executable, *code], capture_output=True, timeout=60).returncode


def test_healthcheck_command_against_a_real_metrics_server() -> None:
    argv = healthcheck_argv(DOCKERFILES[0])
    assert argv == healthcheck_argv(DOCKERFILES[1]), "the two images should check health the same way"
    body: dict[str, Any] = {"state": "starting"}
    server = MetricsServer(NodeMetrics(), host="127.0.0.1", port=0, health=lambda: dict(body)).start()
    try:
        port = int(urllib.parse.urlsplit(server.url).port)
        for state in ("starting", "joining", "online"):
            body["state"] = state
            assert _healthcheck(argv, port) == 0, f"unhealthy while {state}"
        body["state"] = "offline"
        assert _healthcheck(argv, port) != 0, "healthy while offline (shutting down)"
    finally:
        server.shutdown()
    assert _healthcheck(argv, port) != 0, "healthy with nothing listening"


# --- non-root, /data, ports, pins --------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user_with_state_on_the_data_volume(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = only(dockerfile, "USER")
    assert users, "no USER: the daemon would run as root"
    last_user_at, user = users[-1]
    name = user.split(":")[0]
    assert name not in ("root", "0"), user
    runs = only(dockerfile, "RUN")
    assert runs and last_user_at > runs[-1][0], "the last USER must come after every RUN (the installs)"
    # USER names the uid that the image creates and that owns /data.
    created = " ".join(rest for _, rest in runs)
    assert re.search(rf"useradd\b.*--uid {re.escape(name)}\b", created), f"no useradd --uid {name}"
    chown_at = [i for i, rest in runs if re.search(r"\bchown\b.*\s/data\b", rest)]
    volumes = only(dockerfile, "VOLUME")
    assert len(volumes) == 1
    volume_at, volume = volumes[0]
    paths = exec_form(volume) if volume.startswith("[") else volume.split()
    assert paths == ["/data"], paths
    # Changes under a VOLUME after it is declared are thrown away: the chown must come first.
    assert chown_at and chown_at[-1] < volume_at, "chown /data must come before VOLUME /data"
    workdirs = [rest for kw, rest in steps if kw == "WORKDIR"]
    assert workdirs[-1] == "/data"
    env = env_vars(dockerfile)
    assert env.get("HOME") == "/data", "HOME=/data puts the default identity ~/.protoswarm on the volume"
    assert env.get("PROTOSWARM_CACHE_DIR", "/data").startswith("/data")
    assert not SwarmConfig().identity_path.startswith("/") and SwarmConfig().identity_path.startswith("~/")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_exposes_the_p2p_and_metrics_ports(dockerfile: Path) -> None:
    ports = {int(p.split("/")[0]) for _, rest in only(dockerfile, "EXPOSE") for p in rest.split()}
    assert {P2P_PORT, METRICS_PORT} <= ports, ports


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_pinned_first_on_python_311(dockerfile: Path) -> None:
    froms = only(dockerfile, "FROM")
    assert len(froms) == 1
    image = arg_default(dockerfile, froms[0][1].split()[0])
    m = re.fullmatch(r"(?:docker\.io/library/)?python:(3)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?", image)
    assert m and (m.group(1), m.group(2)) == ("3", "11"), image
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11")
    pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    runs = only(dockerfile, "RUN")
    torch_at = [i for i, rest in runs if re.search(rf"\bpip install\b.*\s{re.escape(pin)}(\s|$)", rest)]
    package_at = [i for i, rest in runs if re.search(r"\bpip install\b.*\s/tmp/protoswarm\b", rest)]
    assert torch_at, f"no `pip install ... {pin}`"
    assert package_at and torch_at[0] < package_at[0], "torch must be installed before the package"
    index = re.search(r"--index-url\s+(\S+)", runs[[i for i, _ in runs].index(torch_at[0])][1]).group(1)
    index = arg_default(dockerfile, index.strip('"'))
    if dockerfile.name == "Dockerfile":
        assert index == "https://download.pytorch.org/whl/cpu", index
    else:  # PyPI's torch for Linux x86_64 is a CUDA build (docker/smoke.sh --cuda built it), or a CUDA index
        assert index == "https://pypi.org/simple" or index.startswith("https://download.pytorch.org/whl/cu"), index


# --- build context -----------------------------------------------------------------------------------

def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    excluded = False
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.compile("".join(
            ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else
            tok if tok.startswith("[") else re.escape(tok)
            for tok in re.findall(r"\*\*|\*|\?|\[[^\]]*\]|[^*?\[]+", body)
        ) + r"\Z")
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_build_context_holds_the_package_and_nothing_heavy() -> None:
    from setuptools import find_packages

    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    packages = find_packages(str(REPO), include=PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
    assert "swarm.exchange" in packages  # what `pip install .` in the image ships
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "node/cli.py", "configs/swarm/tiny.toml",
              *(f"{pkg.replace('.', '/')}/__init__.py" for pkg in packages)]
    for path in needed:
        assert (REPO / path).is_file(), path
        assert not _dockerignore_excludes(patterns, path), f".dockerignore leaves out {path}"
    for path in (".venv/bin/python", ".git/HEAD", "runs/node/x.pt", "bench/out/a.json", "tests/operations/test_docker.py",
                 "node/__pycache__/cli.cpython-311.pyc", "protoswarm.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(patterns, path), f".dockerignore lets {path} into the context"


# --- compose wiring ----------------------------------------------------------------------------------

def test_compose_mounts_builds_and_volumes_exist() -> None:
    doc = compose()
    named = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == REPO, f"{name}: the build context is the repository root"
            assert dockerfile_of(svc) in DOCKERFILES, f"{name}: {dockerfile_of(svc)}"
        for source, target, _ in bind_mounts(svc):
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounts {source}, which does not exist"
            else:
                assert source in named, f"{name}: named volume {source} is not declared under volumes:"
            assert target.startswith("/"), target


def test_identity_volumes_are_never_shared() -> None:
    """Two daemons refuse one identity: only a single-container service may have a named /data volume."""
    doc = compose()
    for name, svc in node_services(doc).items():
        replicas = int(svc.get("deploy", {}).get("replicas", 1))
        data = [source for source, target, _ in bind_mounts(svc) if target == "/data"]
        if replicas > 1 or name == "joiner":
            assert not data, f"{name}: its replicas would share the identity on {data}"
        if name == "bootstrap":
            assert data and data[0] in (doc.get("volumes") or {}), "the bootstrap keeps its /data in a named volume"
    assert int(node_services(doc)["joiner"]["deploy"]["replicas"]) >= 1
    # depends_on: service_healthy needs the image's HEALTHCHECK.
    for dep, cond in node_services(doc)["joiner"]["depends_on"].items():
        if cond.get("condition") == "service_healthy":
            assert only(dockerfile_of(doc["services"][dep]), "HEALTHCHECK")


def _prometheus_yml() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_YML.read_text())


def test_prometheus_scrapes_every_node_service() -> None:
    doc = compose()
    nodes = set(node_services(doc))
    (prom_name, prom), = [(n, s) for n, s in doc["services"].items() if str(s.get("image", "")).startswith(
        "docker.io/prom/prometheus:")]  # fully qualified: podman resolves no short names by default
    assert re.fullmatch(r"docker\.io/prom/prometheus:v2\.\d+\.\d+", prom["image"]), "pin a v2.x tag"
    mounts = {target: source for source, target, _ in bind_mounts(prom)}
    assert (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_YML
    jobs = _prometheus_yml()["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == "protoswarm"]
    names = set()
    for sd in job["dns_sd_configs"]:
        assert sd["type"] == "A" and sd["port"] == METRICS_PORT, sd
        names |= set(sd["names"])
    assert names == nodes, f"scraped {sorted(names)}, node services {sorted(nodes)}"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert prom_name not in names


def test_grafana_wiring() -> None:
    doc = compose()
    (graf_name, graf), = [(n, s) for n, s in doc["services"].items()
                          if str(s.get("image", "")).startswith("docker.io/grafana/grafana")]
    (prom_name,) = [n for n, s in doc["services"].items()
                    if str(s.get("image", "")).startswith("docker.io/prom/prometheus:")]
    assert re.fullmatch(r"docker\.io/grafana/grafana(-oss)?:\d+\.\d+\.\d+", graf["image"]), "pin a tag"
    mounts = {target: (COMPOSE.parent / source).resolve() for source, target, _ in bind_mounts(graf)}
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == DOCKER / "grafana/dashboards"
    env = graf.get("environment", {})
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" and env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"

    def host_file(container_path: str) -> Path:
        for target, source in mounts.items():
            if container_path.startswith(target + "/"):
                return source / container_path[len(target) + 1:]
        raise AssertionError(f"{container_path} is in no mount of {graf_name}")

    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert host_file(home).is_file(), f"home dashboard {home} → {host_file(home)} does not exist"
    if not GRAFANA_DATASOURCE.is_file():
        pytest.skip(f"{GRAFANA_DATASOURCE.relative_to(REPO)} is not there yet")
    sources = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    prometheus = [s for s in sources if s.get("type") == "prometheus"]
    assert prometheus, "no prometheus data source"
    for source in prometheus:
        url = urllib.parse.urlsplit(source["url"])
        assert url.hostname == prom_name and (url.port or 80) == PROMETHEUS_PORT, source["url"]
    if GRAFANA_DASHBOARD_PROVIDER.is_file():
        for provider in yaml.safe_load(GRAFANA_DASHBOARD_PROVIDER.read_text())["providers"]:
            path = provider.get("options", {}).get("path")
            if path:
                assert host_file(path.rstrip("/") + "/x").parent.is_dir(), f"provider path {path} is not mounted"


# --- promtool ----------------------------------------------------------------------------------------

def _promtool():
    tools = prometheus_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    return tools.promtool


def test_prometheus_config_passes_promtool() -> None:
    got = subprocess.run([str(_promtool()), "check", "config", str(PROMETHEUS_YML)], capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr


def test_promtool_refuses_a_broken_copy(tmp_path: Path) -> None:
    doc = _prometheus_yml()
    doc["scrape_configs"][0]["dns_sd_configs"][0]["type"] = "AAAAA"
    broken = tmp_path / "prometheus.yml"
    broken.write_text(yaml.safe_dump(doc))
    got = subprocess.run([str(_promtool()), "check", "config", str(broken)], capture_output=True, text=True,
                         timeout=60)
    assert got.returncode != 0, got.stdout + got.stderr
