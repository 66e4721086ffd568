"""Tokenizers: UTF-8 bytes (vocabulary 256), or a local Hugging Face ``tokenizer.json``.

Both turn text into 1-D numpy arrays of token ids, ``uint16`` when the vocabulary fits in 2**16 ids,
else ``int32`` (``token_dtype``), and carry an ``identity`` that the corpus cache key records.
``node.data.load_tokenizer`` picks one from ``data.tokenizer``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from node.config import ConfigError

_ArrayLike = np.ndarray | Sequence[int] | torch.Tensor


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype for token ids below ``vocab_size``: uint16 up to 2**16 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256). ``encode`` returns uint16 so all corpora share a dtype."""

    vocab_size = 256
    name = "bytes"
    identity = "bytes"  # what the corpus cache key records for this tokenizer

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: _ArrayLike) -> str:
        arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte token ids must be in 0..255, got range {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class FileTokenizer:
    """A local Hugging Face ``tokenizer.json`` (optional ``tokenizers`` package); no special tokens added."""

    def __init__(self, path: str | Path) -> None:
        try:
            import tokenizers
        except ImportError as err:
            hint = "pip install 'protoswarm[tokenizer]'"
            raise ConfigError(f"data.tokenizer={str(path)!r} needs the 'tokenizers' package: {hint}") from err
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"data.tokenizer={str(path)!r} is not an existing file")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises plain Exception for malformed files
            raise ConfigError(f"data.tokenizer={str(path)!r} is not a valid tokenizer.json: {err}") from err
        self.name = str(path)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab_size)
        self.identity = "file:" + hashlib.sha256(file.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=self.dtype) for enc in encodings]

    def decode(self, ids: _ArrayLike) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


Tokenizer = ByteTokenizer | FileTokenizer
