"""Tests for node.data: tokenizers, corpus sources and splits, the cache, and deterministic batches."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from node import data
from node.config import ConfigError, DataConfig
from node.data import (
    DOC_SEPARATOR,
    BatchSampler,
    ByteTokenizer,
    FileTokenizer,
    is_validation_file,
    load_corpus,
    load_tokenizer,
    shard_for_seed,
    validation_batches,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROTOSWARM_CACHE_DIR", str(cache))
    return cache


def _write_bin(path: Path, values: np.ndarray) -> None:
    np.asarray(values, dtype="<u2").tofile(path)


# --- tokenizers ---------------------------------------------------------------------------------


@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_decode_replaces_invalid_and_rejects_out_of_range() -> None:
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.name == "bytes"
    assert tok.decode([104, 105, 0xFF]) == "hi\ufffd"
    assert tok.decode(torch.tensor([111, 107])) == "ok"
    with pytest.raises(ValueError):
        tok.decode([256])


def test_file_tokenizer_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"pip install 'protoswarm\[tokenizer\]'"):
        FileTokenizer(tmp_path / "tokenizer.json")


def _train_bpe(path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["def train(model, data):\n    return model(data)\n", "the quick brown fox " * 20]
    tok.train_from_iterator(corpus * 10, trainer=trainer)
    file = path / "tokenizer.json"
    tok.save(str(file))
    return file


def test_file_tokenizer_text_corpus(tmp_path: Path) -> None:
    tok_file = _train_bpe(tmp_path)
    tok = load_tokenizer(str(tok_file))
    assert isinstance(tok, FileTokenizer) and tok.name == str(tok_file)
    assert 256 < tok.vocab_size <= 300
    sample = "def train(model, data): the quick brown fox ünïcode"
    ids = tok.encode(sample)
    assert ids.dtype == np.uint16 and len(ids) < len(sample.encode())  # merges actually happen
    assert tok.decode(ids) == sample
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = DataConfig(source="text", path=str(text), tokenizer=str(tok_file), val_fraction=0.1)
    corpus = load_corpus(cfg)
    assert corpus.vocab_size == tok.vocab_size
    assert corpus.train.max() < tok.vocab_size and len(corpus.val) > 0
    assert tok.decode(np.concatenate([corpus.train, corpus.val])) == text.read_text()
    byte_corpus = load_corpus(DataConfig(source="text", path=str(text), val_fraction=0.1))
    assert byte_corpus.fingerprint != corpus.fingerprint


# --- stdlib source ------------------------------------------------------------------------------


def test_stdlib_corpus_capped(_cache_in_tmp: Path) -> None:
    cfg = DataConfig(source="stdlib", max_bytes=2_000_000, val_fraction=0.1)
    corpus = load_corpus(cfg)
    total = len(corpus.train) + len(corpus.val)
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint16
    assert 1_990_000 < total < 2_200_000  # bytes read plus separators and replacement characters
    assert 0.02 < len(corpus.val) / total < 0.3
    assert "stdlib" in corpus.description and "files" in corpus.description
    assert len(corpus.fingerprint) == 16 and int(corpus.fingerprint, 16) >= 0
    again = load_corpus(cfg)  # from the cache
    assert again.fingerprint == corpus.fingerprint
    np.testing.assert_array_equal(again.train, corpus.train)
    other = load_corpus(DataConfig(source="stdlib", max_bytes=2_000_000, val_fraction=0.2))
    assert other.fingerprint != corpus.fingerprint
    assert len(other.val) > len(corpus.val)


def test_stdlib_build_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = DataConfig(source="stdlib", max_bytes=300_000)
    first = load_corpus(cfg)
    monkeypatch.setenv("PROTOSWARM_CACHE_DIR", str(tmp_path / "elsewhere"))  # forces a rebuild
    assert load_corpus(cfg).fingerprint == first.fingerprint


def test_stdlib_split_is_by_file() -> None:
    root = data.stdlib_dir()
    files = data.list_stdlib_files(root)
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    contents = {f: (root / f).read_bytes().decode("utf-8", errors="replace") for f in files}
    val_texts = {t for f, t in contents.items() if is_validation_file(f, 0.1)}
    train_texts = {t for f, t in contents.items() if not is_validation_file(f, 0.1)}
    corpus = load_corpus(DataConfig(source="stdlib", max_bytes=2_000_000, val_fraction=0.1))
    tok = ByteTokenizer()
    for split, allowed, others in (
        (corpus.val, val_texts, train_texts),
        (corpus.train, train_texts, val_texts),
    ):
        docs = tok.decode(split).split(DOC_SEPARATOR)
        whole = [d for d in docs[:-1] if len(d) > 200]  # the last document may be cut by max_bytes
        assert len(whole) >= 5
        assert all(d in allowed for d in whole)
        assert any(d not in others for d in whole)  # the check tells the splits apart


def test_validation_rule_is_a_stable_hash_of_the_path() -> None:
    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    share = sum(is_validation_file(p, 0.1) for p in paths) / len(paths)
    assert 0.07 < share < 0.13
    # Golden values: every peer, on any version, must hold out the same files.
    golden = [13, 22, 25, 31, 32, 44, 48, 55, 59, 60, 74, 93, 94, 95]
    assert [i for i in range(100) if is_validation_file(f"pkg/mod{i}.py", 0.1)] == golden
    assert all(is_validation_file(p, 0.2) for p in paths if is_validation_file(p, 0.1))


def test_cache_is_used_on_second_load(monkeypatch: pytest.MonkeyPatch, _cache_in_tmp: Path) -> None:
    cfg = DataConfig(source="stdlib", max_bytes=200_000)
    first = load_corpus(cfg)
    cached = list((_cache_in_tmp / "corpus").iterdir())
    assert sorted(p.suffix for p in cached) == [".json", ".npy"]  # no temporary files left behind

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("corpus re-read although it is cached")

    monkeypatch.setattr(data, "_read_documents", no_reading)
    second = load_corpus(cfg)
    assert second.fingerprint == first.fingerprint and second.description == first.description
    np.testing.assert_array_equal(second.val, first.val)
    np.testing.assert_array_equal(second.train, first.train)
    assert isinstance(second.train, np.memmap)  # read in place: nodes on one machine share the pages
    with pytest.raises(AssertionError, match="re-read"):
        load_corpus(DataConfig(source="stdlib", max_bytes=200_001))  # different key: not cached


def test_corrupt_cache_is_rebuilt(_cache_in_tmp: Path) -> None:
    cfg = DataConfig(source="stdlib", max_bytes=100_000)
    first = load_corpus(cfg)
    (cache_file,) = (_cache_in_tmp / "corpus").glob("*.npy")
    cache_file.write_bytes(b"not an array")
    assert load_corpus(cfg).fingerprint == first.fingerprint


# --- text source --------------------------------------------------------------------------------


def test_text_single_file_holds_out_tail(tmp_path: Path) -> None:
    text = "".join(f"line {i} of the story\n" for i in range(1000))
    file = tmp_path / "story.txt"
    file.write_text(text)
    corpus = load_corpus(DataConfig(source="text", path=str(file), val_fraction=0.05))
    n = len(text.encode())
    assert len(corpus.train) + len(corpus.val) == n
    assert len(corpus.val) == round(n * 0.05)
    tok = ByteTokenizer()
    assert tok.decode(corpus.train) + tok.decode(corpus.val) == text


def test_text_directory_split_by_file(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    relpaths = [f"part{i % 3}/doc{i}.{('txt', 'md', 'py')[i % 3]}" for i in range(120)]
    for i, rel in enumerate(relpaths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"<marker-{i}> some text\n")
    (root / "image.png").write_bytes(b"<marker-png>")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("<marker-hidden>")
    corpus = load_corpus(DataConfig(source="text", path=str(root), val_fraction=0.2))
    tok = ByteTokenizer()
    train, val = tok.decode(corpus.train), tok.decode(corpus.val)
    in_val = [is_validation_file(rel, 0.2) for rel in relpaths]
    assert 0 < sum(in_val) < len(relpaths)
    for i, v in enumerate(in_val):
        assert (f"<marker-{i}>" in val) == v and (f"<marker-{i}>" in train) == (not v)
    assert "png" not in train + val and "hidden" not in train + val
    assert "120 files" in corpus.description


def test_text_directory_with_one_file_falls_back_to_tail(tmp_path: Path) -> None:
    (tmp_path / "only.md").write_text("x" * 1007)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), val_fraction=0.1))
    assert (len(corpus.train), len(corpus.val)) == (906, 101)


def test_text_max_bytes_caps_reading(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}.txt").write_text(f"[{i:02d}]" + "y" * 96)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), max_bytes=1050))
    text = ByteTokenizer().decode(np.concatenate([corpus.train, corpus.val]))
    assert len(re.findall(r"\[\d\d\]", text)) == 11  # ten whole files and the start of an eleventh
    assert text.count("y") == 10 * 96 + 46


def test_capped_corpus_keeps_the_validation_share(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"doc{i}.txt").write_text(f"{i:04d}" * 250)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), max_bytes=40_000, val_fraction=0.1))
    total = len(corpus.train) + len(corpus.val)
    assert 40_000 <= total < 40_100 and 0.02 < len(corpus.val) / total < 0.25


def test_empty_and_missing_text_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.bin").write_bytes(b"\0\1")
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_corpus(DataConfig(source="text", path=str(tmp_path)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_corpus(DataConfig(source="text", path=str(empty)))
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_corpus(DataConfig(source="text", path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_corpus(DataConfig(source="tokens", path=str(tmp_path / "nope.bin")))


# --- tokens source ------------------------------------------------------------------------------


def test_tokens_directory_with_val_file(tmp_path: Path) -> None:
    _write_bin(tmp_path / "train.bin", np.arange(1000) * 50)
    _write_bin(tmp_path / "val.bin", np.arange(100) + 7)
    (tmp_path / "meta.pkl").write_bytes(b"ignored")
    corpus = load_corpus(DataConfig(source="tokens", path=str(tmp_path)))
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
    np.testing.assert_array_equal(corpus.train, np.arange(1000) * 50)
    np.testing.assert_array_equal(corpus.val, np.arange(100) + 7)
    assert corpus.vocab_size == 65536 and "val.bin" in corpus.description


def test_tokens_single_file_and_dir_without_val(tmp_path: Path) -> None:
    file = tmp_path / "all.bin"
    _write_bin(file, np.arange(2000))
    corpus = load_corpus(DataConfig(source="tokens", path=str(file), val_fraction=0.1))
    assert isinstance(corpus.train, np.memmap)
    np.testing.assert_array_equal(corpus.train, np.arange(1800))
    np.testing.assert_array_equal(corpus.val, np.arange(1800, 2000))
    from_dir = load_corpus(DataConfig(source="tokens", path=str(tmp_path), val_fraction=0.1))
    assert from_dir.fingerprint == corpus.fingerprint
    _write_bin(file, np.arange(2000) + 1)
    assert load_corpus(DataConfig(source="tokens", path=str(file), val_fraction=0.1)).fingerprint != (
        corpus.fingerprint
    )


def test_tokens_rejects_odd_size_and_several_shards(tmp_path: Path) -> None:
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0\1\2")
    with pytest.raises(ConfigError, match="odd size"):
        load_corpus(DataConfig(source="tokens", path=str(odd)))
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("train_000.bin", "train_001.bin"):
        _write_bin(shards / name, np.arange(10))
    with pytest.raises(ConfigError, match="concatenate"):
        load_corpus(DataConfig(source="tokens", path=str(shards)))


def test_large_arrays_are_fingerprinted_by_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FULL_HASH_BYTES", 1 << 20)
    tokens = np.arange(4 << 20, dtype=np.uint16)
    base = data.corpus_fingerprint(tokens, tokens[:10], 65536)
    changed = tokens.copy()
    changed[0] += 1
    assert data.corpus_fingerprint(changed, tokens[:10], 65536) != base
    assert data.corpus_fingerprint(tokens[:-1], tokens[:10], 65536) != base


def test_fingerprint_covers_split_point_and_vocab() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    base = data.corpus_fingerprint(tokens[:80], tokens[80:], 256)
    assert base == data.corpus_fingerprint(tokens[:80].copy(), tokens[80:].copy(), 256)
    assert data.corpus_fingerprint(tokens[:81], tokens[81:], 256) != base
    assert data.corpus_fingerprint(tokens[:80], tokens[80:], 512) != base


# --- batches ------------------------------------------------------------------------------------


def test_batch_sampler_is_a_pure_function_of_step() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    a = BatchSampler(tokens, seq_len=16, batch_size=4, seed=3)
    b = BatchSampler(tokens.copy(), seq_len=16, batch_size=4, seed=3)
    batch = a.batch(7)
    assert batch.dtype == torch.int64 and batch.shape == (4, 17)
    assert torch.equal(batch[:, 1:], batch[:, :-1] + 1)  # contiguous windows
    assert torch.equal(a.batch(7), b.batch(7))
    assert not torch.equal(a.batch(7), a.batch(8))
    assert not torch.equal(a.batch(7), BatchSampler(tokens, 16, 4, seed=4).batch(7))
    # Golden values: changing them breaks resumption and agreement between peers of different versions.
    assert a.starts(0).tolist() == GOLDEN_STARTS


GOLDEN_STARTS = [4735, 426, 1250, 2929]


def test_shards_stay_inside_their_range() -> None:
    n, count, seq_len = 10_007, 3, 31
    tokens = np.arange(n, dtype=np.int32)
    seen: list[set[int]] = []
    for index in range(count):
        sampler = BatchSampler(tokens, seq_len, batch_size=8, seed=1, shard_index=index, shard_count=count)
        lo, hi = n * index // count, n * (index + 1) // count
        values = torch.cat([sampler.batch(step).reshape(-1) for step in range(300)])
        assert lo <= int(values.min()) and int(values.max()) < hi
        assert int(values.min()) < lo + 50 and int(values.max()) > hi - 50  # the whole range is used
        seen.append(set(values.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_short_shard_and_bad_index_rejected() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ConfigError, match="shard"):
        BatchSampler(tokens, seq_len=40, batch_size=2, seed=0, shard_index=2, shard_count=3)
    with pytest.raises(ConfigError):
        BatchSampler(tokens, seq_len=4, batch_size=2, seed=0, shard_index=3, shard_count=3)


def test_shard_for_seed_is_stable() -> None:
    assert [shard_for_seed(seed, 7) for seed in range(8)] == GOLDEN_SHARDS
    assert {shard_for_seed(seed, 4) for seed in range(100)} == {0, 1, 2, 3}
    assert all(shard_for_seed(seed, 1) == 0 for seed in range(10))
    cfg = DataConfig(seed=5, shard_count=4)
    sampler = BatchSampler.from_config(np.arange(1000, dtype=np.uint16), 8, 2, cfg)
    assert (sampler.shard_index, sampler.shard_count, sampler.seed) == (shard_for_seed(5, 4), 4, 5)


GOLDEN_SHARDS = [3, 1, 1, 0, 4, 5, 3, 5]


def test_validation_batches_fixed_and_disjoint() -> None:
    n, seq_len = 1000, 15
    tokens = np.arange(n, dtype=np.uint16)
    batches = validation_batches(tokens, seq_len, batch_size=4, max_batches=5)
    assert len(batches) == 5 and all(b.shape == (4, 16) and b.dtype == torch.int64 for b in batches)
    again = validation_batches(tokens, seq_len, batch_size=4, max_batches=5)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    rows = torch.cat(batches)
    starts = rows[:, 0]
    assert int(starts[0]) == 0 and int(rows[-1, -1]) == n - 1  # spread over the whole split
    assert bool((starts[1:] - starts[:-1] >= seq_len + 1).all())  # non-overlapping
    assert torch.equal(rows, starts[:, None] + torch.arange(seq_len + 1))


def test_validation_batches_small_split() -> None:
    tokens = np.arange(50, dtype=np.uint16)
    (batch,) = validation_batches(tokens, seq_len=9, batch_size=8, max_batches=3)
    assert batch.shape == (5, 10) and len(set(batch.reshape(-1).tolist())) == 50
    with pytest.raises(ConfigError, match="val"):
        validation_batches(tokens, seq_len=50, batch_size=1, max_batches=1)
