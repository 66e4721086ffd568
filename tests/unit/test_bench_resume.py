"""bench/resume.py: long benches keep each finished unit on disk and a rerun continues from them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from resume import ResultStore, mean_over_seeds


def test_a_rerun_reuses_finished_units_with_the_same_fingerprint(tmp_path):
    store = ResultStore(tmp_path, {"steps": 240, "H": 30})
    assert store.get("dp-s0") is None
    store.put("dp-s0", {"val_loss": 2.5, "curve": [[1, 3.0]]})
    again = ResultStore(tmp_path, {"steps": 240, "H": 30})
    assert again.get("dp-s0") == {"val_loss": 2.5, "curve": [[1, 3.0]]}
    saved = json.loads((tmp_path / "dp-s0.json").read_text())
    assert set(again.commit_of("dp-s0")) == {"commit", "dirty"} and saved["commit"]
    # another configuration, --fresh, or a torn file: the unit runs again
    assert ResultStore(tmp_path, {"steps": 1200, "H": 100}).get("dp-s0") is None
    assert ResultStore(tmp_path, {"steps": 240, "H": 30}, fresh=True).get("dp-s0") is None
    (tmp_path / "dp-s0.json").write_text('{"fingerprint": {"steps": 240, "H": 30}, "res')
    assert again.get("dp-s0") is None


def test_keys_are_plain_file_names_and_no_temporary_file_is_left(tmp_path):
    store = ResultStore(tmp_path, {})
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            store.put(bad, {})
    store.put("ok", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json"]


def test_config_digest_changes_with_a_setting_but_not_with_a_new_setting_left_off():
    from resume import config_digest

    base = {"model": {"d": 256, "table_std": 0.1}, "train": {"steps": 1200}}
    assert config_digest(base) == config_digest(json.loads(json.dumps(base)))
    assert config_digest(base) != config_digest({**base, "model": {"d": 256, "table_std": 1.0}})  # a changed default
    for off in (None, False):  # a setting added later, defaulting to off, keeps the key
        assert config_digest(base) == config_digest({**base, "model": {**base["model"], "new_knob": off}})
    assert config_digest(base) != config_digest({**base, "model": {**base["model"], "new_knob": True}})
    assert config_digest(base) != config_digest({**base, "model": {**base["model"], "new_knob": 0}})


def test_config_digest_counts_only_the_sections_a_bench_depends_on():
    from resume import TRAINING_SECTIONS, config_digest

    run = {"model": {"d": 256}, "train": {"steps": 1200}, "exchange": {"max_group": 16}}
    with_mode = {**run, "exchange": {"max_group": 16, "mode": "star"}}  # a swarm setting added later
    assert config_digest(run, TRAINING_SECTIONS) == config_digest(with_mode, TRAINING_SECTIONS)
    assert config_digest(run) != config_digest(with_mode)  # everything counts without sections
    assert config_digest(run, TRAINING_SECTIONS) != config_digest({**run, "train": {"steps": 300}}, TRAINING_SECTIONS)


def _square(x: int) -> dict:
    """A unit of work for run_units (module level, so a spawned worker can import it)."""
    if x < 0:
        raise ValueError(f"negative {x}")
    import os

    return {"x2": x * x, "pid": os.getpid()}


@pytest.mark.timeout(120)
def test_run_units_runs_what_is_missing_in_worker_processes_and_saves_each(tmp_path):
    from resume import run_units

    store = ResultStore(tmp_path, {"steps": 1})
    store.put("u1", {"x2": -1, "pid": 0})  # kept: never run again
    units = [(f"u{x}", f"unit {x}", (x,)) for x in (1, 2, 3)]
    done = run_units(store, units, _square, jobs=2)
    assert [done[f"u{x}"]["x2"] for x in (1, 2, 3)] == [-1, 4, 9]
    import os

    assert os.getpid() not in {done["u2"]["pid"], done["u3"]["pid"]}  # in worker processes
    assert ResultStore(tmp_path, {"steps": 1}).get("u3")["x2"] == 9  # saved as each finished
    # in this process, one at a time: the same results
    assert run_units(ResultStore(tmp_path / "seq", {}), units, _square)["u2"]["x2"] == 4


def _linger(marks: str) -> dict:
    """A unit that says it started (a file named by its pid under ``marks``) and then trains for ten minutes."""
    import os
    import time

    (Path(marks) / str(os.getpid())).touch()
    time.sleep(600)
    return {}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_the_workers_stop_when_their_runner_is_killed(tmp_path):
    """A runner killed mid-run (SIGKILL: nothing of it runs after) must not leave its workers training units that
    nobody can save any more; they notice their parent is gone and exit."""
    import os
    import signal
    import subprocess
    import time

    marks = tmp_path / "started"
    marks.mkdir()
    bench = Path(__file__).resolve().parents[2] / "bench"
    runner = subprocess.Popen([sys.executable, "-c", (
        f"import sys; sys.path[:0] = [{str(bench)!r}, {str(Path(__file__).parent)!r}]\n"
        "from resume import ResultStore, run_units\n"
        "from test_bench_resume import _linger\n"
        f"run_units(ResultStore({str(tmp_path / 'store')!r}, {{}}), "
        f"[('a', 'a', ({str(marks)!r},)), ('b', 'b', ({str(marks)!r},))], _linger, jobs=2)\n")])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2:
            assert time.monotonic() < deadline, "the two workers never started"
            assert runner.poll() is None, f"the runner ended early ({runner.returncode})"
            workers = [int(p.name) for p in marks.iterdir()]
            time.sleep(0.2)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} still run after their runner was killed"
            time.sleep(0.2)
    finally:
        runner.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_failed_unit_is_named_and_the_others_are_kept(tmp_path, capsys):
    from resume import run_units

    store = ResultStore(tmp_path, {})
    with pytest.raises(SystemExit, match=re.escape("1 unit(s) failed: unit -1")):
        run_units(store, [("bad", "unit -1", (-1,)), ("good", "unit 5", (5,))], _square, jobs=2)
    assert store.get("good")["x2"] == 25 and store.get("bad") is None
    assert "ValueError: negative -1" in capsys.readouterr().err


def test_no_unit_starts_after_the_deadline_and_the_ones_left_are_named(tmp_path):
    from resume import run_units

    store = ResultStore(tmp_path, {})
    store.put("kept", {"x2": 1})
    with pytest.raises(SystemExit, match=re.escape("2 unit(s) not started before the 0-s deadline: unit 2, unit 3")):
        run_units(store, [("kept", "unit 1", (1,)), ("u2", "unit 2", (2,)), ("u3", "unit 3", (3,))], _square,
                  deadline_s=0)
    assert store.get("u2") is None
    assert run_units(store, [("kept", "unit 1", (1,)), ("u2", "unit 2", (2,))], _square, deadline_s=60)["u2"]["x2"] == 4


def test_a_unit_of_another_configuration_is_never_overwritten(tmp_path):
    from resume import run_units

    ResultStore(tmp_path, {"replicas": 4}).put("dp-s0", {"x2": 16})
    other = ResultStore(tmp_path, {"replicas": 1})
    assert other.get("dp-s0") is None and other.foreign("dp-s0") == {"replicas": 4}
    with pytest.raises(ValueError, match="another configuration"):
        other.put("dp-s0", {"x2": 1})
    with pytest.raises(SystemExit, match="give this run a --state of its own"):
        run_units(other, [("dp-s0", "dp", (1,))], _square)
    assert ResultStore(tmp_path, {"replicas": 4}).get("dp-s0") == {"x2": 16}
    (tmp_path / "torn.json").write_text('{"fingerprint": {"repl')
    other.put("torn", {"x2": 1})  # a torn file is no unit: replaced


def test_a_gpu_store_keeps_its_units_apart_and_the_cpu_keys_unchanged(tmp_path):
    cpu, gpu = ResultStore(tmp_path, {"steps": 1}), ResultStore(tmp_path, {"steps": 1}, device="cuda:0")
    assert cpu.key("dp-s0") == "dp-s0" and gpu.key("dp-s0") == "dp-s0-cuda0"
    cpu.put(cpu.key("dp-s0"), {"x2": 1})
    gpu.put(gpu.key("dp-s0"), {"x2": 2})
    assert cpu.get("dp-s0") == {"x2": 1} and gpu.get("dp-s0-cuda0") == {"x2": 2}
    assert gpu.fingerprint == {"steps": 1, "device": "cuda:0"} and cpu.fingerprint == {"steps": 1}


def test_config_digest_leaves_out_min_dense_tail_layers_where_it_changes_nothing():
    from resume import config_digest

    def run(model, stages=4, splits=None):
        return {"model": {"d": 256, "n_layers": 8, **model}, "pipeline": {"num_stages": stages, "layer_splits": splits}}

    before = config_digest(run({"subspace_rank": 8}))  # a unit kept before the setting existed
    assert config_digest(run({"subspace_rank": 8, "min_dense_tail_layers": 0})) == before
    assert config_digest(run({"subspace_rank": 8, "min_dense_tail_layers": 3})) != before  # reshaped: another unit
    for inert in (run({"min_dense_tail_layers": 3}), run({"subspace_rank": 8, "min_dense_tail_layers": 3}, stages=1),
                  run({"subspace_rank": 8, "dense_tail_layers": 4, "min_dense_tail_layers": 3}),
                  run({"subspace_rank": 8, "min_dense_tail_layers": 3}, splits=[2, 4, 6])):
        without = {**inert, "model": {k: v for k, v in inert["model"].items() if k != "min_dense_tail_layers"}}
        assert config_digest(inert) == config_digest(without)


def test_a_variants_row_is_the_mean_over_its_seeds_with_spread_and_commits():
    runs = [{"val_loss": 1.5, "val_curve": [(10, 3.0), (20, 1.5)], "seed": 0, "commit": "aaa", "dirty": False,
             "tokens": 100},
            {"val_loss": 1.3, "val_curve": [(10, 2.0), (20, 1.3)], "seed": 1, "commit": "bbb", "dirty": True,
             "tokens": 100}]
    row = mean_over_seeds("k=8", runs)
    assert row["label"] == "k=8" and row["tokens"] == 100 and "seed" not in row and "commit" not in row
    assert row["val_loss"] == pytest.approx(1.4) and row["val_loss_std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["val_curve"] == [(10, pytest.approx(2.5)), (20, pytest.approx(1.4))]
    assert row["val_loss_per_seed"] == [1.5, 1.3] and row["commits"] == ["aaa", "bbb+dirty"]
    assert row["devices"] == ["cpu"]
    assert mean_over_seeds("one", runs[:1])["val_loss_std"] is None  # one seed: no spread claimed
