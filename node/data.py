"""Training data: token corpora with a fixed train/validation split, and deterministic batches.

* Tokens are 1-D numpy arrays: ``uint16`` when the vocabulary fits in 2**16 ids, else ``int32``.
  The tokenizers are node/tokenizer.py's; ``load_tokenizer`` picks the one ``data.tokenizer`` names.
* Sources (``DataConfig.source``): ``stdlib``, the embedded default, is every ``*.py`` file of this
  interpreter's standard library (site-/dist-packages excluded), so a node trains offline with nothing
  to fetch; ``text`` is one UTF-8 file or a directory searched recursively for ``TEXT_SUFFIXES`` files
  (hidden paths skipped); ``tokens`` is nanoGPT-style raw little-endian uint16 ``.bin`` files, which
  are memory-mapped (see ``_load_token_files``).
* Text is split by document: a file is validation iff ``is_validation_file(relpath, val_fraction)``,
  a hash of its relative path alone. Files are read in a fixed pseudo-random order (a differently
  salted path hash) and each split joins its documents with ``DOC_SEPARATOR``; ``max_bytes``
  truncates that order, so a capped corpus still holds both splits. When the per-file rule leaves a
  split empty (one file, a handful of files), the last ``val_fraction`` of the tokens is held out.
* Tokenized text is cached atomically (temporary file + rename) in ``<cache>/corpus/<key>.npy`` (both
  splits, memory-mapped when read: nodes on one machine share its pages) and ``<key>.json`` (sizes, description),
  ``<cache>`` being ``$PROTOSWARM_CACHE_DIR``, else ``$XDG_CACHE_HOME/protoswarm``, else
  ``~/.cache/protoswarm``; the key covers the interpreter version, the files' sizes and mtimes, the
  tokenizer file's content, ``val_fraction`` and ``max_bytes``.
* ``TokenCorpus.fingerprint`` (16 hex digits of SHA-256 over the vocabulary size and both splits)
  lets peers check they train on the same tokens; arrays over ``FULL_HASH_BYTES`` are hashed by
  length plus 64 evenly spaced 1 MiB blocks.
* Batches are pure functions of (seed, shard, step): ``BatchSampler`` cuts the training tokens into
  ``shard_count`` equal contiguous ranges and draws windows inside its own range from a PCG64 stream
  seeded by (seed, shard_index, shard_count, step), reducing raw 64-bit draws itself (NumPy does not
  promise to keep ``Generator.integers``' algorithm). Resuming needs only the step count, and every
  machine draws the same windows. ``validation_batches`` uses fixed, evenly spaced, disjoint windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.config import ConfigError, DataConfig
from node.tokenizer import ByteTokenizer, FileTokenizer, Tokenizer, token_dtype

logger = logging.getLogger(__name__)

DOC_SEPARATOR = "\x1e"  # ASCII record separator: one byte-token, absent from ordinary text and code.
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".py", ".rst", ".text", ".txt")
FULL_HASH_BYTES = 256 << 20
_SAMPLE_BLOCK_BYTES = 1 << 20
_SAMPLE_BLOCKS = 64
_ENCODE_CHUNK = 256  # documents per tokenizers.encode_batch call (bounds the Encoding objects alive)
_CACHE_FORMAT = 2


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` gives the byte tokenizer; anything else is the path of a tokenizer.json file."""
    return ByteTokenizer() if spec == "bytes" else FileTokenizer(spec)


@dataclass
class TokenCorpus:
    """Tokenized training and validation splits (1-D integer arrays, possibly memory-mapped)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str
    fingerprint: str


def corpus_fingerprint(train: np.ndarray, val: np.ndarray, vocab_size: int) -> str:
    """16 hex digits identifying the vocabulary size and the exact tokens of both splits."""
    h = hashlib.sha256(f"protoswarm-corpus vocab={vocab_size}".encode())
    for name, arr in (("train", train), ("val", val)):
        flat = np.asarray(arr).reshape(-1)
        flat = flat.astype(flat.dtype.newbyteorder("<"), copy=False)
        h.update(f"|{name} {flat.dtype.str} {flat.size}|".encode())
        if flat.nbytes <= FULL_HASH_BYTES:
            h.update(np.ascontiguousarray(flat))
        else:
            block = _SAMPLE_BLOCK_BYTES // flat.itemsize
            for start in np.linspace(0, flat.size - block, _SAMPLE_BLOCKS).astype(np.int64):
                h.update(np.ascontiguousarray(flat[start : start + block]))
    return h.hexdigest()[:16]


def is_validation_file(relpath: str, val_fraction: float) -> bool:
    """Whether the document at ``relpath`` (POSIX, relative to the corpus root) is held out."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def _read_order(relpath: str) -> bytes:
    return hashlib.sha256(b"protoswarm-read-order:" + relpath.encode()).digest()


def cache_dir() -> Path:
    """Root of protoswarm's caches (corpora live in its ``corpus/`` subdirectory)."""
    if os.environ.get("PROTOSWARM_CACHE_DIR"):
        return Path(os.environ["PROTOSWARM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "protoswarm"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_files(root: Path, keep: Callable[[str], bool], skip_dir: Callable[[str], bool]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if keep(name) and os.path.isfile(os.path.join(dirpath, name)):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted POSIX paths, relative to the stdlib directory, of its ``*.py`` files (no site-packages)."""
    skip = ("site-packages", "dist-packages", "__pycache__")
    return _list_files(root or stdlib_dir(), lambda name: name.endswith(".py"), lambda name: name in skip)


def list_text_files(root: Path) -> list[str]:
    """Sorted relative paths of the files under ``root`` that the ``text`` source reads."""
    keep = lambda name: name.endswith(TEXT_SUFFIXES) and not name.startswith(".")  # noqa: E731
    return _list_files(root, keep, lambda name: name.startswith(".") or name == "__pycache__")


def load_corpus(cfg: DataConfig) -> TokenCorpus:
    """Load (or build and cache) the corpus ``cfg`` describes; user mistakes raise ConfigError."""
    cfg.check_paths()
    tok = load_tokenizer(cfg.tokenizer)
    if cfg.source == "tokens":
        return _load_token_files(cfg, tok)
    if cfg.source == "stdlib":
        root = stdlib_dir()
        files = list_stdlib_files(root)
        label = "stdlib"
        empty = f"no standard-library sources under {root}; set data.source='text' and data.path instead"
    else:
        path = Path(str(cfg.path)).expanduser()
        root, files = (path, list_text_files(path)) if path.is_dir() else (path.parent, [path.name])
        label = f"text {cfg.path}"
        empty = f"data.path={cfg.path!r} holds no text (read: files ending in {', '.join(TEXT_SUFFIXES)})"
    if not files:
        raise ConfigError(empty)
    return _load_documents(label, root, files, tok, cfg, empty)


def _load_documents(
    label: str, root: Path, files: list[str], tok: Tokenizer, cfg: DataConfig, empty: str
) -> TokenCorpus:
    stats = [(rel, st.st_size, st.st_mtime_ns) for rel in files for st in [(root / rel).stat()]]
    key_parts = [_CACHE_FORMAT, sys.version, str(root.resolve()), stats, tok.identity]
    key_parts += [cfg.val_fraction, cfg.max_bytes, DOC_SEPARATOR]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:32]
    cache_file = cache_dir() / "corpus" / f"{key}.npy"
    cached = _read_cache(cache_file)
    if cached is not None:
        logger.info("corpus %s (cached in %s)", cached.description, cache_file)
        return cached
    started = time.perf_counter()
    docs = _read_documents(label, root, files, cfg.max_bytes)
    dtype = token_dtype(tok.vocab_size)
    sep = tok.encode(DOC_SEPARATOR).astype(dtype)
    encoded: list[np.ndarray] = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        chunk = [text for _, text in docs[i : i + _ENCODE_CHUNK]]
        encoded += [ids.astype(dtype, copy=False) for ids in tok.encode_batch(chunk)]
    in_val = [is_validation_file(rel, cfg.val_fraction) for rel, _ in docs]
    train = _join([ids for ids, v in zip(encoded, in_val, strict=True) if not v], sep, dtype)
    val = _join([ids for ids, v in zip(encoded, in_val, strict=True) if v], sep, dtype)
    n_val_docs = sum(in_val)
    split = f"{len(docs) - n_val_docs} train / {n_val_docs} val files"
    if train.size == 0 or val.size == 0:
        everything = _join(encoded, sep, dtype)
        if everything.size == 0:
            raise ConfigError(empty)
        train, val = _tail_split(everything, cfg.val_fraction, label)
        split = f"last {cfg.val_fraction:.1%} of tokens held out"
    description = (
        f"{label}: {len(docs)} files ({split}), {train.size + val.size:,} tokens "
        f"(train {train.size:,}, val {val.size:,}), tokenizer {tok.name}"
    )
    fingerprint = corpus_fingerprint(train, val, tok.vocab_size)
    corpus = TokenCorpus(train, val, tok.vocab_size, description, fingerprint)
    logger.info("corpus %s; built in %.1f s", description, time.perf_counter() - started)
    _write_cache(cache_file, corpus)
    return corpus


def _read_documents(label: str, root: Path, files: list[str], max_bytes: int | None) -> list[tuple[str, str]]:
    """(relpath, text) in the fixed read order, stopping once ``max_bytes`` bytes have been read."""
    order = sorted(files, key=_read_order)
    logger.info("%s: reading up to %d files under %s", label, len(order), root)
    report_every = max(1, len(order) // 4)
    remaining = max_bytes
    docs: list[tuple[str, str]] = []
    total = 0
    for i, rel in enumerate(order, 1):
        try:
            with open(root / rel, "rb") as f:
                data = f.read() if remaining is None else f.read(remaining)
        except OSError as err:
            raise ConfigError(f"{label}: cannot read {root / rel}: {err}") from err
        docs.append((rel, data.decode("utf-8", errors="replace")))
        total += len(data)
        if i % report_every == 0:
            logger.info("%s: read %d/%d files, %.1f MB", label, i, len(order), total / 1e6)
        if remaining is not None:
            remaining -= len(data)
            if remaining <= 0:
                logger.info("%s: stopped at data.max_bytes=%d after %d files", label, max_bytes, i)
                break
    return docs


def _join(parts: list[np.ndarray], sep: np.ndarray, dtype: np.dtype) -> np.ndarray:
    pieces = [piece for ids in parts for piece in (sep, ids)][1:]  # separators between documents
    return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)


def _tail_split(tokens: np.ndarray, val_fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last ``val_fraction`` of ``tokens`` (at least one token in each split); views only."""
    n = len(tokens)
    if n < 2:
        raise ConfigError(f"{what}: only {n} token(s), too few to split into training and validation")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return tokens[: n - n_val], tokens[n - n_val :]


def _read_cache(path: Path) -> TokenCorpus | None:
    """The cached corpus at ``path`` (``.npy``; its ``.json`` beside it), memory-mapped, or None."""
    meta_file = path.with_suffix(".json")
    if not path.is_file() or not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        n_train = int(meta.pop("train_tokens"))
        if tokens.ndim != 1 or not 0 < n_train < len(tokens):
            raise ValueError(f"{len(tokens)} cached tokens cannot hold {n_train} training tokens and a validation split")
        return TokenCorpus(train=tokens[:n_train], val=tokens[n_train:], **meta)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        logger.warning("ignoring unreadable corpus cache %s (%s); rebuilding it", path, err)
        return None


def _write_cache(path: Path, corpus: TokenCorpus) -> None:
    """Write ``corpus`` to ``path`` (.npy) and its metadata beside it (.json), each atomically
    (temporary file + os.replace), the tokens last; failures only warn."""
    meta = {name: getattr(corpus, name) for name in ("vocab_size", "description", "fingerprint")}
    meta["train_tokens"] = len(corpus.train)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
        _write_atomic(path, lambda f: np.save(f, np.concatenate([corpus.train, corpus.val]), allow_pickle=False))
    except OSError as err:
        logger.warning("could not write corpus cache %s: %s", path, err)


def _write_atomic(path: Path, write: Callable[[Any], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _memmap_tokens(file: Path) -> np.ndarray:
    size = file.stat().st_size
    if size % 2:
        raise ConfigError(f"data.path: {file} has an odd size ({size} bytes), so it is not uint16 ids")
    if size == 0:
        raise ConfigError(f"data.path: {file} is empty")
    return np.memmap(file, dtype="<u2", mode="r")


def _load_token_files(cfg: DataConfig, tok: Tokenizer) -> TokenCorpus:
    """Raw little-endian uint16 ``.bin`` files, memory-mapped (``data.max_bytes`` does not apply).

    ``data.path`` may be one file (its last ``val_fraction`` of tokens is validation) or a directory
    with exactly one training ``.bin`` file and at most one ``.bin`` file whose name starts with
    ``val`` (without one, the training file's tail is held out). Memory maps cannot be concatenated
    without copying, so several training shards are rejected: join them first (``cat a.bin b.bin``).
    """
    path = Path(str(cfg.path)).expanduser()
    if tok.vocab_size > 1 << 16:
        raise ConfigError(f"data.tokenizer has {tok.vocab_size} ids, more than uint16 token files can hold")
    vocab = tok.vocab_size if cfg.tokenizer != "bytes" else 1 << 16
    if path.is_dir():
        bins = sorted(p for p in path.iterdir() if p.suffix == ".bin" and p.is_file() and p.name[0] != ".")
        val_files = [p for p in bins if p.name.startswith("val")]
        train_files = [p for p in bins if not p.name.startswith("val")]
        if not train_files:
            raise ConfigError(f"data.path={cfg.path!r} holds no training .bin token file")
        for kind, found in (("training", train_files), ("validation", val_files)):
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise ConfigError(
                    f"data.path={cfg.path!r} holds {len(found)} {kind} .bin files ({names}); one per "
                    "split is memory-mapped, so concatenate them first (cat part1.bin part2.bin > train.bin)"
                )
    else:
        train_files, val_files = [path], []
    train = _memmap_tokens(train_files[0])
    if val_files:
        val = _memmap_tokens(val_files[0])
        split = f"validation file {val_files[0].name}"
    else:
        train, val = _tail_split(train, cfg.val_fraction, f"data.path={cfg.path!r}")
        split = f"last {cfg.val_fraction:.1%} of {train_files[0].name} held out"
    description = (
        f"tokens {cfg.path}: training file {train_files[0].name}, {split}, {train.size + val.size:,} "
        f"tokens (train {train.size:,}, val {val.size:,}), vocabulary {vocab}"
    )
    logger.info("corpus %s", description)
    return TokenCorpus(train, val, vocab, description, corpus_fingerprint(train, val, vocab))


def shard_for_seed(seed: int, shard_count: int) -> int:
    """The data shard a peer with ``seed`` takes: a stable SHA-256 hash, the same on every machine."""
    if shard_count < 1:
        raise ConfigError(f"data.shard_count must be positive, got {shard_count}")
    digest = hashlib.sha256(f"protoswarm-shard:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shard_count


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")


def _windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> torch.Tensor:
    idx = starts.astype(np.int64)[:, None] + np.arange(window, dtype=np.int64)
    return torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))


class BatchSampler:
    """Random training windows from one contiguous shard; ``batch(step)`` is a pure function of step.

    Each batch is an int64 tensor ``(batch_size, seq_len + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ConfigError(f"shard index {shard_index} is outside 0..data.shard_count-1={shard_count - 1}")
        if np.ndim(tokens) != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {np.shape(tokens)}")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.window = seq_len + 1
        n = len(tokens)
        self.start = n * shard_index // shard_count
        self.stop = n * (shard_index + 1) // shard_count
        if self.stop - self.start < self.window:
            raise ConfigError(
                f"data shard {shard_index} of {shard_count} holds {self.stop - self.start} tokens, fewer "
                f"than one window of train.seq_len+1={self.window}; lower data.shard_count or add data"
            )
        self.num_starts = self.stop - self.start - self.window + 1

    @classmethod
    def from_config(cls, tokens: np.ndarray, seq_len: int, batch_size: int, cfg: DataConfig) -> BatchSampler:
        shard = shard_for_seed(cfg.seed, cfg.shard_count)
        return cls(tokens, seq_len, batch_size, cfg.seed, shard, cfg.shard_count)

    def starts(self, step: int) -> np.ndarray:
        """Absolute start positions of the windows of ``batch(step)``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        entropy = [self.seed % 2**64, self.shard_index, self.shard_count, step]
        raw = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(self.batch_size)
        # Modulo bias is below num_starts / 2**64: negligible, and stable across NumPy versions.
        return self.start + (raw % np.uint64(self.num_starts)).astype(np.int64)

    def batch(self, step: int) -> torch.Tensor:
        return _windows(self.tokens, self.starts(step), self.window)


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int
) -> list[torch.Tensor]:
    """Fixed, non-overlapping windows spread evenly from the start to the end of ``tokens``.

    Gives ``min(max_batches, windows_that_fit // batch_size)`` full ``(batch_size, seq_len + 1)`` int64
    batches; when fewer than ``batch_size`` windows fit, one smaller batch of all of them.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    window = seq_len + 1
    n = len(tokens)
    capacity = n // window
    if capacity == 0:
        raise ConfigError(
            f"validation split holds {n} tokens, fewer than one window of train.seq_len+1={window}; "
            "raise data.val_fraction or lower train.seq_len"
        )
    n_batches = min(max_batches, capacity // batch_size)
    per_batch = batch_size if n_batches else capacity
    total = max(n_batches, 1) * per_batch
    # floor(i*(n-window)/(total-1)): consecutive starts differ by >= window since total <= n // window.
    starts = np.arange(total, dtype=np.int64) * (n - window) // max(total - 1, 1)
    return [_windows(tokens, starts[i : i + per_batch], window) for i in range(0, total, per_batch)]
