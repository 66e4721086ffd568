"""Using an exported model (node/model_files.py): its validation loss and samples from it.

:func:`evaluate_model` scores the validation split the run trained against (``data`` of the run's
parameters in the export: the embedded stdlib corpus by default, the same windows ``node train-local``
evaluates on) or a text file given instead. :func:`generate` samples continuations with temperature
and top-k, feeding the whole context each step (cropped to ``model.max_seq_len``): no key/value cache,
simple and exact, fast enough for the models this project trains on one machine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from node.config import ConfigError, RunConfig
from node.data import load_corpus, load_tokenizer, validation_batches
from node.device import autocast
from node.model import LanguageModel, lm_loss
from node.model_files import TOKENIZER_FILE, Exported
from node.tokenizer import ByteTokenizer, Tokenizer


def export_tokenizer(exported: Exported) -> Tokenizer:
    """The export's tokenizer: the byte tokenizer, or its tokenizer.json (needs the ``tokenizers`` package)."""
    if exported.cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    return load_tokenizer(str(exported.path / TOKENIZER_FILE))


@torch.no_grad()
def evaluate_model(model: LanguageModel, cfg: RunConfig, text: str | Path | None = None, seq_len: int | None = None,
                   batch_size: int | None = None, max_batches: int | None = None,
                   tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Mean next-token loss (nats per token) over fixed validation windows; also bits per token and perplexity.

    Without ``text`` the windows are the run's own validation split, chosen as ``node train-local`` chooses
    them (``train.seq_len``, ``train.batch_size``, ``train.eval_batches``); with it, the same spread of
    windows over the whole file."""
    seq_len = seq_len or cfg.train.seq_len
    batch_size = batch_size or cfg.train.batch_size
    max_batches = max_batches or cfg.train.eval_batches
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    if text is None:
        tokens, source = load_corpus(cfg.data).val, f"the run's validation split ({cfg.data.source})"
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--text {text}: not a file")
        tok = tokenizer or ByteTokenizer()
        tokens, source = tok.encode(path.read_text(encoding="utf-8", errors="replace")), str(path)
    batches = validation_batches(tokens, seq_len, batch_size, max_batches)
    device = next(model.parameters()).device
    started, total, count = time.perf_counter(), 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        n = batch[:, 1:].numel()
        total, count = total + float(loss) * n, count + n
    loss = total / count
    return {"val_loss": round(loss, 5), "bits_per_token": round(loss / math.log(2), 5),
            "perplexity": round(math.exp(loss), 4), "tokens": count, "windows": sum(len(b) for b in batches),
            "seq_len": seq_len, "source": source, "device": str(device),
            "seconds": round(time.perf_counter() - started, 2)}


@torch.no_grad()
def generate(model: LanguageModel, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 40, seed: int | None = None) -> list[int]:
    """``prompt_ids`` followed by ``max_new_tokens`` sampled ids. ``temperature`` 0 is greedy; ``top_k`` keeps
    the k likeliest ids before sampling (None or 0: all)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k < 0):
        raise ConfigError("temperature, top-k and the number of new tokens must not be negative")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    ids = list(prompt_ids)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
        with autocast(device):
            logits = model(context)[0, -1].float()
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    return ids
