"""bench/gpu_long.sh: every variant it would train on a lent GPU exists (a typo must not waste a lease)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCRIPT = (ROOT / "bench" / "gpu_long.sh").read_text()


def test_every_convergence_knob_is_a_valid_configuration():
    from bench.convergence import parse_variant
    from node.config import load_config

    knobs = re.findall(r'--variant "([^"]+)"', SCRIPT)
    assert len(knobs) >= 10
    for text in knobs:
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
    assert proc.returncode == 2 and "--first names no variant" in proc.stderr and "k=8 tial4" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing trained, nothing saved
