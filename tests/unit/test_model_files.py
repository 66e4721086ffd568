"""Export files (node/model_files.py): the native format reloads bit-exactly, the hf format is a Llama that
transformers loads and that computes what ours computes, and the tokenizer file is the byte tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from node.config import load_config
from node.model import LanguageModel
from node.model_files import ExportError, load_export, merge_dense, write_export
from node.tokenizer import ByteTokenizer


def trained_like(overrides=(), stages: int = 3, seed: int = 0):
    """A subspace model whose every parameter moved off its init (so a lost or misplaced tensor shows)."""
    cfg = load_config("tiny", [f"pipeline.num_stages={stages}", "model.subspace_rank=8", "model.n_layers=4",
                               "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", *overrides])
    torch.manual_seed(seed)
    model = LanguageModel(cfg.model, cfg.pipeline)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return cfg, model.eval()


def batch(vocab: int = 256, n: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def test_native_export_reloads_bit_exactly_and_computes_the_same(tmp_path):
    cfg, model = trained_like()
    out = write_export(tmp_path / "m", model, cfg, "native", provenance={"stages": [{"stage": 0}]})
    back = load_export(out)
    assert back.meta["format"] == "native" and back.meta["provenance"] == {"stages": [{"stage": 0}]}
    ours, theirs = model.state_dict(), back.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [list(s.layers) for s in back.model.stages] == [list(s.layers) for s in model.stages]
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids), back.model(ids))


def test_the_merged_dense_model_computes_what_the_subspace_model_computes():
    _, model = trained_like()
    dense_cfg, state = merge_dense(model)
    assert dense_cfg.subspace_rank is None and not dense_cfg.uses_fixed_table
    dense = LanguageModel(dense_cfg)
    dense.load_state_dict(state, strict=True)
    ids = batch()
    with torch.no_grad():
        a, b = model(ids), dense.eval()(ids)
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max()


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, model = trained_like()
    out = write_export(tmp_path / "hf", model, cfg, "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = batch()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3, (ours - theirs).abs().max()
    # And our own loader reads the hf directory back as the same function.
    back = load_export(out)
    assert back.meta["format"] == "hf" and back.cfg.model.subspace_rank is None
    with torch.no_grad():
        assert (back.model(ids) - ours).abs().max().item() < 1e-4


def test_the_tokenizer_file_is_the_byte_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    cfg, model = trained_like(stages=2)
    out = write_export(tmp_path / "m", model, cfg, "native")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "def f(x):\n\treturn x ** 2  # ünïcødé €\x00\x7f"
    ids = tok.encode(text).ids
    assert ids == ByteTokenizer().encode(text).tolist()
    assert tok.decode(ids) == text and tok.get_vocab_size() == 256


def test_exports_refuse_what_they_cannot_write_or_read(tmp_path):
    cfg, model = trained_like(["model.table_gain=true"], stages=2)
    with pytest.raises(ExportError, match="table_gain"):
        write_export(tmp_path / "hf", model, cfg, "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        write_export(tmp_path / "full", model, cfg, "native")
    with pytest.raises(ExportError, match="not a protoswarm export"):
        load_export(tmp_path / "full")
    out = write_export(tmp_path / "ok", model, cfg, "native")
    meta = json.loads((out / "protoswarm.json").read_text())
    (out / "protoswarm.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ExportError, match="version 99"):
        load_export(out)
    (out / "protoswarm.json").write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{broken}")
    with pytest.raises(ExportError, match=r"model\.safetensors"):
        load_export(out)


def _record(peer: str, history: list[str], state: str = "online"):
    from protocol.messages import StageRecord

    return StageRecord(peer_id=peer, run_id="r", stage=0, num_stages=1, state=state, outer_history=history)


def test_export_donors_follow_the_drift_rule():
    from node.export_swarm import agreed_replicas

    a, b, c = "3:aa", "3:bb", "4:cc"
    # Two of three replicas hold chain aa at round 3: the third has drifted and is no donor.
    donors, history = agreed_replicas(0, [_record("p1", [a, "1:x"]), _record("p2", [a, "1:x"]),
                                          _record("p3", [b, "1:x"])], 2)
    assert [r.peer_id for r in donors] == ["p1", "p2"] and history == [a, "1:x"]
    # Replicas at different rounds are not in conflict: the history most of them share wins ...
    donors, history = agreed_replicas(0, [_record("p1", [a]), _record("p2", [a]), _record("p3", [c])], 1)
    assert [r.peer_id for r in donors] == ["p1", "p2"]
    # ... and on a tie, the one with more rounds applied.
    donors, history = agreed_replicas(0, [_record("p1", [a]), _record("p3", [c])], 1)
    assert [r.peer_id for r in donors] == ["p3"] and history == [c]
    # Two replicas at the same round with different chains: no majority, refused.
    with pytest.raises(ExportError, match="disagree with no majority"):
        agreed_replicas(0, [_record("p1", [a]), _record("p2", [b])], 1)
    with pytest.raises(ExportError, match="publishes an outer history"):
        agreed_replicas(0, [_record("p1", [a])], 2)


def test_export_downloads_every_stage_at_once_and_a_failed_stage_cancels_the_rest(tmp_path, monkeypatch):
    import asyncio
    from types import SimpleNamespace

    import node.export_swarm as export_swarm

    class FakeP2P:
        closed = False

        async def shutdown(self):
            FakeP2P.closed = True

    async def replicate_p2p():
        return FakeP2P()

    dht = SimpleNamespace(dht=SimpleNamespace(replicate_p2p=replicate_p2p))
    monkeypatch.setattr(export_swarm, "GatedP2P", lambda p2p, access: p2p)
    cfg = SimpleNamespace(pipeline=SimpleNamespace(num_stages=3))
    in_flight, most, cancelled = set(), [0], []

    async def download(self, p2p, cfg, run_id, stage, servers, scratch, fail=None, hang=()):
        in_flight.add(stage)
        most[0] = max(most[0], len(in_flight))
        try:
            await asyncio.sleep(0.05 * (3 - stage))  # the last stage finishes first
            if stage == fail:
                raise ExportError(f"stage {stage}: cannot download its state")
            if stage in hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(stage)
            raise
        finally:
            in_flight.discard(stage)
        self.provenance.append({"stage": stage})
        return f"store{stage}"

    monkeypatch.setattr(export_swarm.SwarmExport, "_download", download)
    export = export_swarm.SwarmExport(["/ip4/127.0.0.1/tcp/1"], None)
    stores = asyncio.run(export._download_all(dht, cfg, "r", {}, tmp_path))
    assert stores == ["store0", "store1", "store2"] and most[0] == 3  # all three at once, results in stage order
    assert [e["stage"] for e in export.provenance] == [0, 1, 2] and FakeP2P.closed

    async def failing(self, *args):
        return await download(self, *args, fail=1, hang=(0,))

    monkeypatch.setattr(export_swarm.SwarmExport, "_download", failing)
    FakeP2P.closed = False
    with pytest.raises(ExportError, match="stage 1"):
        asyncio.run(export_swarm.SwarmExport(["x"], None)._download_all(dht, cfg, "r", {}, tmp_path))
    assert cancelled == [0] and FakeP2P.closed and not in_flight


def test_a_boundary_model_exports_natively_and_refuses_the_llama_form(tmp_path):
    cfg, model = trained_like(["model.subspace_param='boundary'", "model.boundary_learned=true",
                               "model.boundary_anchor_rank=8"])
    with pytest.raises(ExportError, match="subspace_param='boundary'"):
        write_export(tmp_path / "hf", model, cfg, "hf")
    assert not list(tmp_path.iterdir())
    back = load_export(write_export(tmp_path / "m", model, cfg, "native"))
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids), back.model(ids))
