"""docker/smoke.sh's cheap parts: its arguments, its skips, its verdict, and the compose files it brings up
(validated by podman-compose itself, which needs no podman for `--dry-run config`).

The smoke proper (building images, bringing the swarm up, SIGKILL and resume) takes minutes and root and
podman: it is run by hand for issue 21 and recorded in docs/docker.md.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from node.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
SMOKE_SH = REPO / "docker" / "smoke.sh"
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())

pytestmark = pytest.mark.timeout(180)


def smoke_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protoswarm_docker_smoke", REPO / "docker" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SMOKE_SH), *argv], capture_output=True, text=True, timeout=150)


def dry_run(*argv: str) -> dict:
    if shutil.which("podman-compose") is None and not (Path(sys.executable).parent / "podman-compose").is_file():
        pytest.skip("podman-compose is not installed (pip install -e '.[dev]' provides it)")
    done = run_smoke("--dry-run", *argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_names_every_option() -> None:
    done = run_smoke("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--joiners", "--base", "--cuda", "--timeout", "--dry-run", "--keep", "--torch-wheels"):
        assert option in done.stdout


@pytest.mark.parametrize("argv", [["--joiners", "0"], ["--timeout", "-1"], ["--checkpoint-every", "0"],
                                  ["--no-such-flag"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    done = run_smoke(*argv)
    assert done.returncode == 2 and "error" in done.stderr, (done.returncode, done.stderr)


@pytest.mark.parametrize("joiners", [2, 3])
def test_dry_run_validates_the_compose_files_it_brings_up(joiners: int) -> None:
    plan = dry_run("--joiners", str(joiners))
    assert plan["compose_valid"] is True
    assert set(plan["services"]) == {"bootstrap", "joiner", "prometheus", "grafana"}
    assert plan["joiner_replicas"] == joiners  # podman-compose reads deploy.replicas (mode: replicated)
    assert plan["images"]["bootstrap"] == plan["images"]["joiner"] == "localhost/protoswarm:smoke"
    # The override adds only the shorter checkpoint interval, and only to the bootstrap: a joiner takes the
    # run's parameters from the swarm and refuses train.checkpoint_every (its container would restart forever).
    boot, joiner = plan["commands"]["bootstrap"], plan["commands"]["joiner"]
    assert boot[-2:] == ["--set", "train.checkpoint_every=30"]
    assert "--set" not in joiner and "--join" in joiner
    for argv in (boot, joiner):
        build_parser().parse_args(["start", *argv])  # every flag is one of node start's


def test_the_override_keeps_the_compose_command() -> None:
    smoke = smoke_module()
    command = smoke.override_compose(7)["services"]["bootstrap"]["command"]
    assert command == [*COMPOSE["services"]["bootstrap"]["command"], "--set", "train.checkpoint_every=7"]
    assert set(smoke.override_compose(7)["services"]) == {"bootstrap"}


def test_the_dashboard_query_is_the_panels(tmp_path: Path) -> None:
    expr = smoke_module().dashboard_query("Nodes online")
    assert expr == 'sum(protoswarm_state{job="protoswarm", instance=~".*", state="online"})'


@pytest.mark.parametrize("missing", ["root", "podman"])
def test_skips_with_the_reason(missing: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    smoke = smoke_module()
    if missing == "root":
        monkeypatch.setattr(smoke.os, "geteuid", lambda: 1000)
    else:
        monkeypatch.setattr(smoke.os, "geteuid", lambda: 0)
        real = shutil.which
        monkeypatch.setattr(smoke.shutil, "which", lambda name: None if name == "podman" else real(name))
    assert smoke.main([]) == smoke.SKIPPED
    assert missing in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"]


def test_the_verdict_needs_every_check() -> None:
    smoke = smoke_module()
    good = {"nodes_online": 3, "targets_up": 3, "loss_falling": True, "resume_ok": True, "teardown_clean": True,
            "node_uid": 10001, "data_is_a_volume": True}
    assert smoke.ok(good, joiners=2)
    for key, bad in [("nodes_online", 2), ("targets_up", 2), ("loss_falling", False), ("resume_ok", False),
                     ("teardown_clean", False), ("grafana_nodes_online", 1), ("node_uid", 0),
                     ("data_is_a_volume", False)]:
        assert not smoke.ok({**good, key: bad}, joiners=2), key
    for key in good:
        assert not smoke.ok({k: v for k, v in good.items() if k != key}, joiners=2), key
