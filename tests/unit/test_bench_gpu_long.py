"""bench/gpu_long.sh: every variant it would train on a lent GPU (bench/convergence.KNOBS for the knobs) exists
(a typo must not waste a lease); and the long runs' options for runs that span sessions (--first, --kept)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCRIPT = (ROOT / "bench" / "gpu_long.sh").read_text()


def test_every_convergence_knob_is_a_valid_configuration():
    from bench.convergence import KNOBS, parse_variant
    from node.config import load_config

    assert "--knobs" in SCRIPT and len(KNOBS) >= 10
    labels = [parse_variant(text)[0] for text in KNOBS]
    assert len(set(labels)) == len(labels) and not {"dense", "dense+fixed_table", "subspace k=8"} & set(labels)
    for text in KNOBS:
        _label, overrides = parse_variant(text)
        load_config("local/tiny", [*overrides, "train.device='cuda'"])  # raises on an unknown or invalid key


def test_every_diloco_variant_is_known_to_the_bench():
    from bench.diloco import variants

    names = ",".join(re.findall(r"^dil_variants\+?=(\S+)", SCRIPT, re.M)).split(",")
    names = [n.lstrip(",") for n in names if n.lstrip(",")]
    assert "streaming_int2_ef" in names and "streaming_topk_ef" in names
    assert not set(names) - set(variants(100, 4))


def test_convergence_first_must_name_a_variant_of_the_run(tmp_path):
    """``--first`` reorders the units; a label that is no variant is refused before any training."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "convergence.py"), "--ks", "8", "--first", "k=8 tial4",
                           "--state", str(tmp_path), "--no-plot"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--first/--reference name no variant" in proc.stderr and "k=8 tial4" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing trained, nothing saved


def test_convergence_first_trains_the_labels_in_the_order_given():
    """``--first B --first A``: B's units (seed order), then A's, then the rest as they were."""
    from bench.convergence import first_in_order

    units = [(f"key-{label}-{seed}", f"{label} (seed {seed})", (), label, seed)
             for seed in range(3) for label in ("dense", "A", "B", "C")]
    order = [(u[3], u[4]) for u in first_in_order(units, ["B", "A", "B"])]
    assert order == [("B", 0), ("B", 1), ("B", 2), ("A", 0), ("A", 1), ("A", 2),
                     ("dense", 0), ("C", 0), ("dense", 1), ("C", 1), ("dense", 2), ("C", 2)]
    assert first_in_order(units, []) == units


def test_the_committed_units_keep_their_keys_when_the_tiny_preset_moves():
    """The benches train on ``bench.resume.KEPT_TINY`` (tiny's model settings before its recipe), so the units
    committed under bench/state are still found: a unit's key hashes its whole resolved config."""
    from bench.convergence import common_settings, unit_key
    from bench.diloco import seed_setup
    from bench.resume import TRAINING_SECTIONS, config_digest

    state = ROOT / "bench" / "state"
    for label, overrides in (("dense", ["model.subspace_rank='none'", "model.fixed_table=false"]),
                             ("k=8 tail3", ["model.subspace_rank=8", "model.dense_tail_layers=3"])):
        assert (state / "convergence-full" / f"{unit_key(label, overrides, common_settings(1200, []), 0)}.json").exists()
    key = unit_key("k=8 tail4", ["model.subspace_rank=8", "model.dense_tail_layers=4"],
                   common_settings(1200, ["model.n_layers=12"]), 0)
    assert (state / "convergence-12l" / f"{key}.json").exists()
    digest = config_digest(seed_setup(0, 1200, 4)[0].to_dict(), TRAINING_SECTIONS)
    assert (state / "diloco-full" / f"data_parallel-{digest}-s0.json").exists()


_KEPT_STEPS = 20
_KEPT_COMMON = [f"train.steps={_KEPT_STEPS}", "train.warmup_steps=10", f"train.eval_every={_KEPT_STEPS // 6}",
                "train.eval_batches=16", "train.log_every=100000", "train.checkpoint_every=0"]


def _keep(tmp_path, label: str, overrides: list[str], seed: int, loss: float, rank: int | None = None) -> None:
    """Save one finished convergence unit under ``tmp_path`` as the bench would (no training)."""
    from bench.convergence import unit_key
    from bench.resume import ResultStore

    ResultStore(tmp_path, {"common": _KEPT_COMMON}).put(
        unit_key(label, overrides, _KEPT_COMMON, seed),
        {"label": label, "subspace_rank": rank, "val_loss": loss, "val_curve": [[10, loss + 1], [20, loss]], "tokens": 1000})


def _kept(tmp_path, *extra: str) -> dict:
    """``bench/convergence.py --kept`` over ``tmp_path``'s units (k = 8, 2 seeds): its JSON."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "convergence.py"), "--kept", "--ks", "8", "--seeds", "2",
                           "--steps", str(_KEPT_STEPS), "--state", str(tmp_path), "--no-plot", *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _keep_baselines(tmp_path) -> None:
    _keep(tmp_path, "dense", ["model.subspace_rank='none'", "model.fixed_table=false"], 0, 2.0)
    for seed, loss in ((0, 1.9), (1, 1.7)):
        _keep(tmp_path, "dense+fixed_table", ["model.subspace_rank='none'", "model.fixed_table=true"], seed, loss)
    _keep(tmp_path, "subspace k=8", ["model.subspace_rank=8", "model.min_dense_tail_layers=0"], 1, 1.9, rank=8)


def test_convergence_kept_reads_the_table_from_the_units_there_and_trains_nothing(tmp_path):
    """``--kept``: each variant's mean over the seeds it has, the missing units named, no training."""
    import subprocess

    from bench.convergence import unit_key

    _keep_baselines(tmp_path)
    cut_off = tmp_path / ".partial" / unit_key("dense", ["model.subspace_rank='none'", "model.fixed_table=false"],
                                               _KEPT_COMMON, 1)
    cut_off.mkdir(parents=True)
    for step in (10, 15):  # a unit cut off after its checkpoint of step 15
        (cut_off / f"ckpt-{step:08d}.pt").write_bytes(b"")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = _kept(tmp_path)
    assert out["seeds_per_variant"] == {"dense": [0], "dense+fixed_table": [0, 1], "subspace k=8": [1]}
    assert out["missing"] == ["subspace k=8 (seed 0)", "dense (seed 1)"]
    assert out["in_progress"] == {"dense (seed 1)": 15}
    assert abs(out["dense_fixed_table_val_loss"] - 1.8) < 1e-9 and out["best_dense"] == "dense+fixed_table"
    assert abs(out["gap_pct_vs_best_dense"]["8"] - 100 * (1.9 - 1.8) / 1.8) < 1e-9
    assert out["gap_pct_vs_best_dense_same_seeds"]["8"] == round(100 * (1.9 / 1.7 - 1), 3)  # seed 1's baseline
    assert out["reference"] is None and out["gap_pct_vs_reference_same_seeds"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing trained or written

    # a dense knob row that beats both baselines is the best dense model; --reference adds a same-seeds column
    knob = "dense init0.04:model.subspace_rank='none',model.init_std=0.04"
    _keep(tmp_path, "dense init0.04", knob.split(":")[1].split(","), 1, 1.5)
    out = _kept(tmp_path, "--variant", knob, "--reference", "subspace k=8")
    assert out["best_dense"] == "dense init0.04" and out["best_dense_val_loss"] == 1.5
    assert abs(out["gap_pct_vs_best_dense"]["8"] - 100 * (1.9 - 1.5) / 1.5) < 1e-9
    assert abs(out["gap_pct"]["8"] - 100 * (1.9 - 1.8) / 1.8) < 1e-9  # still against dense + table
    assert out["gap_pct_vs_reference_same_seeds"] == {
        "dense": None, "dense+fixed_table": round(100 * (1.7 / 1.9 - 1), 3), "subspace k=8": 0.0,
        "dense init0.04": round(100 * (1.5 / 1.9 - 1), 3)}
    unknown = subprocess.run([sys.executable, str(ROOT / "bench" / "convergence.py"), "--kept", "--ks", "8",
                              "--steps", str(_KEPT_STEPS), "--state", str(tmp_path), "--no-plot", "--reference", "k=8 nope"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert unknown.returncode == 2 and "--reference name no variant" in unknown.stderr, unknown.stderr


def test_convergence_best_dense_row_is_chosen_on_the_seeds_rows_share(tmp_path):
    """A dense row whose mean is lower only because it has just a lucky seed is not the best dense model."""
    _keep_baselines(tmp_path)
    knob = "dense init0.04:model.subspace_rank='none',model.init_std=0.04"
    for seed, loss in ((0, 1.3), (1, 1.5)):  # mean 1.4
        _keep(tmp_path, "dense init0.04", knob.split(":")[1].split(","), seed, loss)
    lucky = "dense lucky:model.subspace_rank='none',model.init_std=0.05"
    _keep(tmp_path, "dense lucky", lucky.split(":")[1].split(","), 0, 1.35)  # below 1.4, above 1.3 on seed 0
    out = _kept(tmp_path, "--variant", knob, "--variant", lucky)
    assert out["best_dense"] == "dense init0.04" and abs(out["best_dense_val_loss"] - 1.4) < 1e-9
    assert out["seeds_per_variant"]["dense lucky"] == [0]


def test_diloco_kept_reads_the_table_from_the_units_there_and_trains_nothing(tmp_path):
    """``bench/diloco.py --kept``: each variant's mean over the seeds it has, against data parallel's mean over
    its own; the missing units named; nothing trained or written."""
    import json
    import subprocess

    from bench.diloco import seed_setup
    from bench.resume import TRAINING_SECTIONS, ResultStore, config_digest

    steps, H, P, replicas = 240, 30, 3, 4  # --quick's
    store = ResultStore(tmp_path, {"steps": steps, "H": H, "P": P, "replicas": replicas})
    kept = {("data_parallel", 0): (2.0, 1000), ("data_parallel", 1): (2.2, 1000), ("streaming_int2_ef", 1): (2.31, 2)}
    for (label, seed), (loss, sent) in kept.items():
        digest = config_digest(seed_setup(seed, steps, replicas)[0].to_dict(), TRAINING_SECTIONS)
        store.put(store.key(f"{label}-{digest}-s{seed}"),
                  {"val_loss": loss, "val_curve": [[10, loss + 1], [20, loss]], "bytes_sent_per_replica": sent,
                   "peak_bytes_per_step": sent, "seconds": 1.0})
    digest = config_digest(seed_setup(0, steps, replicas)[0].to_dict(), TRAINING_SECTIONS)
    cut = store.partial(store.key(f"streaming_e3m0-{digest}-s0"))  # a unit cut off after its step-120 checkpoint
    cut.mkdir(parents=True)
    (cut / "ckpt-00000120.pt").write_bytes(b"")  # --kept lists it by name; nothing reads it
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "diloco.py"), "--quick", "--kept", "--seeds", "2",
                           "--only", "streaming_int2_ef,streaming_e3m0", "--state", str(tmp_path), "--no-plot"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seeds_per_variant"] == {"data_parallel": [0, 1], "streaming_int2_ef": [1]}
    assert out["missing"] == ["streaming_int2_ef (seed 0)", "streaming_e3m0 (seed 0)", "streaming_e3m0 (seed 1)"]
    row = out["variants"]["streaming_int2_ef"]
    assert row["loss_gap_pct_vs_dp"] == round(100 * (2.31 / 2.1 - 1), 2) and row["bytes_ratio_vs_dp"] == 500.0
    assert row["loss_gap_pct_vs_dp_same_seeds"] == round(100 * (2.31 / 2.2 - 1), 2)  # seed 1's data parallel
    assert "streaming_e3m0" not in out["variants"]
    assert out["in_progress"] == {"streaming_e3m0 (seed 0)": 120}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing trained or written


def test_diloco_set_overrides_make_units_of_their_own_and_bad_ones_are_refused(tmp_path):
    """``bench/diloco.py --set``: another model's units are keyed apart (a run without the override finds none of
    them), its table reads them, and an override the config refuses is a clean usage error."""
    import json
    import subprocess

    from bench.diloco import seed_setup
    from bench.resume import TRAINING_SECTIONS, ResultStore, config_digest
    from node.engine import build_engine

    steps, H, P, replicas = 240, 30, 3, 4
    small = ("model.d_model=128", "model.n_heads=4", "model.ffn_hidden=512")
    store = ResultStore(tmp_path, {"steps": steps, "H": H, "P": P, "replicas": replicas})
    digest = config_digest(seed_setup(0, steps, replicas, small)[0].to_dict(), TRAINING_SECTIONS)
    store.put(store.key(f"data_parallel-{digest}-s0"), {"val_loss": 2.0, "val_curve": [[10, 3.0], [20, 2.0]],
                                                         "bytes_sent_per_replica": 8, "peak_bytes_per_step": 8, "seconds": 1.0})

    def kept(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench" / "diloco.py"), "--quick", "--kept", "--state",
                               str(tmp_path), "--no-plot", *extra], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

    proc = kept(*[a for o in small for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["set"] == list(small) and out["variants"]["data_parallel"]["val_loss"] == 2.0
    tiny = sum(p.numel() for p in build_engine(seed_setup(0, steps, replicas)[0], 0).module.parameters())
    assert out["params"] < tiny / 2  # the smaller model's count
    unkeyed = kept()
    assert unkeyed.returncode == 2 and "no unit of the data_parallel baseline" in unkeyed.stderr
    bad = kept("--set", "model.d_model=oops")
    assert bad.returncode == 2 and "--set:" in bad.stderr and "Traceback" not in bad.stderr


def test_convergence_set_overrides_are_checked_and_keyed_apart(tmp_path):
    """``bench/convergence.py --set``: an override the config refuses is a usage error; the units of a run without
    it (here: one kept dense unit) are not read as the overridden model's."""
    import subprocess

    from bench.convergence import unit_key
    from bench.resume import ResultStore

    steps = 20
    common = [f"train.steps={steps}", "train.warmup_steps=10", f"train.eval_every={steps // 6}",
              "train.eval_batches=16", "train.log_every=100000", "train.checkpoint_every=0"]
    ResultStore(tmp_path, {"common": common}).put(
        unit_key("dense", ["model.subspace_rank='none'", "model.fixed_table=false"], common, 0),
        {"label": "dense", "subspace_rank": None, "val_loss": 2.0, "val_curve": [[20, 2.0]], "tokens": 1})

    def kept(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench" / "convergence.py"), "--kept", "--ks", "8",
                               "--steps", str(steps), "--state", str(tmp_path), "--no-plot", *extra],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

    bad = kept("--set", "model.n_layers=many")
    assert bad.returncode == 2 and "--set:" in bad.stderr and "Traceback" not in bad.stderr
    other = kept("--set", "model.n_layers=4")
    assert other.returncode == 2 and "no unit of this run is kept" in other.stderr, other.stderr
    same = kept()  # without the override the dense unit is found (the table then lacks its other baseline)
    assert same.returncode == 2 and "no unit of the dense+fixed_table baseline" in same.stderr, same.stderr


def test_diloco_average_moments_makes_the_synced_fragments_optimizer_state_agree():
    """The ``_adam`` diagnostic: after a fragment's round is applied, every replica holds the same AdamW moments
    for its parameters (the others' still differ), and the moments' bytes are counted."""
    import torch

    from bench.diloco import Run, seed_setup, variants

    small = ("model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2")
    cfg, samplers, val = seed_setup(0, 4, 2, small)
    spec = variants(8, 2)["streaming_e3m0_H8_lr4e-4_olr0.8_adam"]
    settings = dataclasses.replace(spec["settings"], inner_steps=4, fragments=2, overlap=0)  # fragment 1 at step 2

    def state_after(average: bool) -> tuple[Run, list]:
        run = Run(cfg, samplers, val[:1], 2, eval_every=2)
        run.diloco(settings, spec["codec"], average_moments=average)
        return run, run.engines

    run, engines = state_after(True)
    assert run.group.loops[0].rounds_applied == [0, 1]
    names = run.group.loops[0].layouts[1].names
    other = run.group.loops[0].layouts[0].names
    moments = [{n: e.optimizer.state[p]["exp_avg_sq"] for n, p in e.module.named_parameters()} for e in engines]
    assert all(torch.equal(moments[0][n], moments[1][n]) for n in names)
    assert not all(torch.equal(moments[0][n], moments[1][n]) for n in other)
    plain, _ = state_after(False)
    assert sum(run.bytes_per_step) - sum(plain.bytes_per_step) == 8 * sum(
        p.numel() for n, p in engines[0].module.named_parameters() if n in names)



def test_diloco_first_moment_probe_averages_the_4bit_first_moment_alone_and_counts_its_bytes():
    """The ``_m4`` probe: after a fragment's round, every replica holds the same first moment for its parameters
    (the mean of the replicas' e3m0-rounded ones), the second moments still differ, and the bytes are e3m0's."""
    import torch

    from bench.diloco import Run, seed_setup, variants
    from protocol.codecs import get_codec

    small = ("model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2")
    cfg, samplers, val = seed_setup(0, 4, 2, small)
    spec = variants(100, 4)["streaming_e3m0_H8_lr6e-4_olr0.8_m4"]
    assert spec["average_first_moment"] == "e3m0" and spec["inner_lr"] == 6e-4
    settings = dataclasses.replace(spec["settings"], inner_steps=4, fragments=2, overlap=0)  # fragment 1 at step 2

    def run(first_moment: str | None) -> Run:
        done = Run(cfg, samplers, val[:1], 2, eval_every=2)
        done.diloco(settings, spec["codec"], average_first_moment=first_moment)
        return done

    probe = run("e3m0")
    names = probe.group.loops[0].layouts[1].names
    params = [dict(e.module.named_parameters()) for e in probe.engines]
    state = [{n: e.optimizer.state[p[n]] for n in names} for e, p in zip(probe.engines, params, strict=True)]
    assert all(torch.equal(state[0][n]["exp_avg"], state[1][n]["exp_avg"]) for n in names)
    assert not all(torch.equal(state[0][n]["exp_avg_sq"], state[1][n]["exp_avg_sq"]) for n in names)
    e3m0 = get_codec("e3m0")
    assert sum(probe.bytes_per_step) - sum(run(None).bytes_per_step) == sum(
        e3m0.payload_nbytes(params[0][n].numel()) for n in names)
    assert variants(100, 4)["streaming_e3m0_H4_lr6e-4_olr0.8"]["settings"].inner_steps == 4


def test_first_moment_bound_is_adams_own_and_the_clipped_probe_keeps_every_replica_inside_it():
    """``first_moment_bound``: no gradient sequence takes AdamW's |m| / √v past it, and the worst one reaches it;
    the ``_m4c`` probe leaves every replica's synced first moment inside its own bound."""
    import torch

    from bench.diloco import Run, first_moment_bound, seed_setup, variants

    b1, b2 = 0.9, 0.95
    bound = first_moment_bound(b1, b2)
    assert abs(bound - 1.165) < 1e-3
    g = torch.randn(400, 1000, generator=torch.Generator().manual_seed(0)) * torch.rand(400, 1)  # varying scales
    worst = torch.tensor([((1 - b1) * b1 ** i) / ((1 - b2) * b2 ** i) for i in range(400)]).flip(0)
    m, v = torch.zeros(1001), torch.zeros(1001)
    for step in range(400):
        grad = torch.cat([g[step], worst[step:step + 1]])  # the last column: the gradients that reach the bound
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    ratio = m.abs() / v.sqrt()
    assert ratio.max() <= bound * (1 + 1e-5) and ratio[-1] > 0.999 * bound
    with pytest.raises(ValueError, match="no bound"):
        first_moment_bound(0.99, 0.95)

    small = ("model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2")
    cfg, samplers, val = seed_setup(0, 4, 2, small)
    spec = variants(100, 4)["streaming_e3m0_H8_lr6e-4_olr0.8_m4c"]
    assert spec["clip_first_moment"] and spec["average_first_moment"] == "e3m0"
    settings = dataclasses.replace(spec["settings"], inner_steps=4, fragments=2, overlap=0)

    def worst_ratio(clip: bool | None) -> float:
        """The largest |m| / (bound √v) over the replicas' synced fragment after its round (``clip`` None: the
        swarm's own diloco.first_moment, the ``_fm`` variant)."""
        probe = Run(cfg, samplers, val[:1], 2, eval_every=2)
        if clip is None:
            probe.diloco(dataclasses.replace(settings, first_moment=True), spec["codec"])
        else:
            probe.diloco(settings, spec["codec"], average_first_moment="e3m0", clip_first_moment=clip)
        worst = 0.0
        for engine in probe.engines:
            params = dict(engine.module.named_parameters())
            for n in probe.group.loops[0].layouts[1].names:
                st = engine.optimizer.state[params[n]]
                worst = max(worst, float((st["exp_avg"].abs() / (bound * st["exp_avg_sq"].sqrt() + 1e-30)).max()))
        return worst

    # Unclipped, the mean of the replicas' first moments lies outside one replica's own bound on this toy at
    # step 2: steps no local Adam would take. Clipped, every replica is inside it.
    assert worst_ratio(False) > 2.0
    assert worst_ratio(True) <= 1 + 1e-5
    fm = variants(100, 4)["streaming_e3m0_H8_lr6e-4_olr0.8_fm"]
    assert fm["settings"].first_moment and "average_first_moment" not in fm and fm["inner_lr"] == 6e-4
    assert worst_ratio(None) <= 1 + 1e-5
