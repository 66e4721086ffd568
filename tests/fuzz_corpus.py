"""The fuzz cases for each P2P stream handler, built from a seeded ``random.Random`` (the harness and the
oracle are tests/fuzz_util.py): ``pipeline_corpus``, ``state_corpus`` and ``exchange_corpus``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from fuzz_util import (
    MAX_INT,
    Case,
    PipelineTarget,
    StateTarget,
    framing_cases,
    header_cases,
    mutation_cases,
    non_finite_cases,
    tensor_cases,
    with_header,
    with_payload,
)

from protocol.framing import MAGIC, encode_frame
from protocol.messages import (
    ActivationFrame,
    ErrorReply,
    FragmentPart,
    GradientFrame,
    Message,
    StateChunk,
    StateChunkRequest,
    StateRequest,
    encode_message,
)
from protocol.tensors import WireLimits


def ids(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def floats(shape: tuple[int, ...], seed: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------- corpora

LARGE_BYTES = 8 << 20  # the "large" cases: frames well under the cap that the node must read whole


def pipeline_corpus(rng: random.Random, t: PipelineTarget, client: str, vocab: int, *, large: bool = False,
                    mutations: int = 24) -> list[Case]:
    """Cases for the pipeline handler (swarm/dataplane/serve.py) of a node serving stage ``t.stage``."""
    s, k = t.stage, t.width
    seeds = iter(range(1 << 30))

    def frame(batch: int = 2, seq: int = 17, width: int = k, **changes) -> ActivationFrame:
        seed = next(seeds)
        fields = dict(run_id=t.run_id, microbatch_id=rng.randrange(1, 1 << 40), stage=s - 1, route=[client] * s,
                      token_ids=ids((batch, seq), vocab, seed), coefficients=floats((batch, seq, width), seed),
                      codec="bf16", basis=t.basis, budget_s=10.0)
        return ActivationFrame(**{**fields, **changes})

    def enc(msg: Message) -> bytes:
        return encode_message(msg)

    valid = [enc(frame()), enc(frame(codec="fp32")), enc(frame(batch=1, seq=5, codec="int8"))]
    semantic = {
        "valid": frame(), "valid_e3m0": frame(codec="e3m0"), "absurd_ints": frame(microbatch_id=MAX_INT, step=MAX_INT),
        "absurd_budget": frame(budget_s=1e300), "wrong_run": frame(run_id="another-run"),
        "wrong_stage": frame(stage=s, route=[client] * (s + 1)), "absurd_stage": frame(stage=MAX_INT),
        "basis": frame(basis="0" * 16), "wrong_width": frame(width=k + 1), "short_seq": frame(seq=1),
        "long_seq": frame(seq=t.max_seq_len + 1), "empty_batch": frame(batch=0), "route": frame(route=[client] * (s + 1)),
        "ids_out_of_vocab": frame(token_ids=torch.full((2, 17), vocab + 44)),
        "ids_huge": frame(token_ids=torch.full((2, 17), 1 << 40)),
        "gradient_request": GradientFrame(run_id=t.run_id, microbatch_id=1, stage=s + 1, grad=floats((2, 17, k), 1)),
        "other_kind": StateRequest(run_id=t.run_id, stage=s),
        "error_kind": ErrorReply(code="frame", message="you first"),
    }
    cases = [Case(f"semantic_{name}", encode_frame(enc(msg))) for name, msg in semantic.items()]
    body = valid[0]
    neg = torch.tensor([[-5] + [1] * 16, [2] * 17], dtype=torch.int32)
    cases += [
        Case("ids_negative", encode_frame(with_payload(body, "token_ids", {"codec": "i32", "shape": [2, 17]},
                                                       neg.numpy().tobytes()))),
        Case("ids_vs_coefficients", encode_frame(with_payload(
            body, "coefficients", {"codec": "bf16", "shape": [2, 16, k]}, bytes(2 * 2 * 16 * k)))),
        Case("codec_field_mismatch", encode_frame(with_header(body, lambda h: h.__setitem__("codec", "fp32")))),
    ]
    cases += non_finite_cases(lambda codec: frame(codec=codec), "coefficients")
    cases += tensor_cases(body, "token_ids", integer=True) + tensor_cases(body, "coefficients", integer=False)
    cases += header_cases(rng, valid, 16) + mutation_cases(rng, valid, mutations)
    cases += framing_cases(rng, valid, WireLimits())
    if large:  # read whole, then refused: the garbage at the header, the message for its width
        cases += [Case("large_garbage", encode_frame(rng.randbytes(LARGE_BYTES))),
                  Case("large_message", encode_frame(enc(frame(batch=4, seq=t.max_seq_len, width=2048, codec="fp32"))))]
    return cases


def state_corpus(rng: random.Random, t: StateTarget, digest: str, *, large: bool = False,
                 mutations: int = 16) -> list[Case]:
    """Cases for the state server (swarm/state_transfer.py); ``digest`` names a state it holds."""
    nchunks = t.chunks[digest]

    def chunk_req(**changes) -> StateChunkRequest:
        return StateChunkRequest(**{**dict(run_id=t.run_id, stage=t.stage, digest=digest, index=0), **changes})

    valid = [encode_message(StateRequest(run_id=t.run_id, stage=t.stage)), encode_message(chunk_req()),
             encode_message(chunk_req(index=nchunks - 1))]
    semantic = {
        "valid_manifest": StateRequest(run_id=t.run_id, stage=t.stage),
        "valid_consensus": StateRequest(run_id=t.run_id, stage=t.stage, part="consensus"),
        "valid_chunk": chunk_req(index=rng.randrange(nchunks)),
        "wrong_run": StateRequest(run_id="another-run", stage=t.stage), "wrong_stage": StateRequest(run_id=t.run_id, stage=t.stage + 1),
        "absurd_stage": StateRequest(run_id=t.run_id, stage=MAX_INT), "chunk_wrong_run": chunk_req(run_id="another-run"),
        "chunk_unknown_digest": chunk_req(digest="e" * 64), "chunk_bad_digest": chunk_req(digest="zz"),
        "chunk_out_of_range": chunk_req(index=nchunks), "chunk_absurd_index": chunk_req(index=MAX_INT),
        "chunk_wrong_stage": chunk_req(stage=t.stage + 1),
        "other_kind": StateChunk(run_id=t.run_id, stage=t.stage, digest=digest, index=0, data=b"\x00" * 64),
        "error_kind": ErrorReply(code="stale", message="you first"),
        "gradient_kind": GradientFrame(run_id=t.run_id, microbatch_id=1, stage=1, grad=floats((1, 2, 3), 2)),
    }
    cases = [Case(f"semantic_{name}", encode_frame(encode_message(msg))) for name, msg in semantic.items()]
    blob = encode_message(semantic["other_kind"])
    cases += [
        Case("bad_part", encode_frame(with_header(valid[0], lambda h: h.__setitem__("part", "everything")))),
        *(Case("blob_descriptor", encode_frame(with_payload(blob, "data", d))) for d in
          ({"bytes": -1}, {"bytes": 1 << 40}, {"bytes": "64"}, {"codec": "u8", "shape": [64]}, {"bytes": 63})),
    ]
    cases += header_cases(rng, valid, 12) + mutation_cases(rng, valid, mutations)
    cases += framing_cases(rng, valid, WireLimits())
    if large:
        cases += [Case("large_garbage", encode_frame(rng.randbytes(LARGE_BYTES))),
                  Case("large_blob", encode_frame(encode_message(StateChunk(run_id=t.run_id, stage=t.stage, digest=digest,
                                                                             index=0, data=rng.randbytes(LARGE_BYTES)))))]
    return cases


@dataclass(frozen=True)
class FragmentStream:
    """The parts of one fragment a fuzzing member sends, framed (the valid base of :func:`exchange_corpus`)."""

    run_id: str
    stage: int
    fragment: int
    round_id: int
    total: int  # values in the fragment
    per_part: int
    codec: str

    @property
    def num_parts(self) -> int:
        return max(1, -(-self.total // self.per_part))

    def part(self, index: int = 0, **changes) -> FragmentPart:
        offset = index * self.per_part
        n = min(self.per_part, self.total - offset)
        fields = dict(run_id=self.run_id, stage=self.stage, round_id=self.round_id, fragment_id=self.fragment,
                      part=index, num_parts=self.num_parts, offset=offset, total_values=self.total, codec=self.codec,
                      values=floats((n,), index, 1e-3))
        return FragmentPart(**{**fields, **changes})

    def stream(self, first: bytes | None = None, *rest: FragmentPart, after: bytes = b"") -> bytes:
        """Frames of a whole fragment: ``first`` (a body) in place of part 0, then the other parts."""
        later = list(rest) if rest else [self.part(i) for i in range(1, self.num_parts)]
        return (encode_frame(first if first is not None else encode_message(self.part(0)))
                + b"".join(encode_frame(encode_message(p)) for p in later) + after)

    def first_changed(self, **changes) -> bytes:
        """The whole fragment with part 0 changed."""
        return self.stream(encode_message(self.part(0, **changes)))


def _exchange_semantic(rng: random.Random, f: FragmentStream, sizes: list[int]) -> dict[str, bytes]:
    """Whole fragments that frame and decode but break one of the exchange's rules (b"": not possible here)."""
    total, per_part, num_parts, fragment = f.total, f.per_part, f.num_parts, f.fragment
    other = 1 - fragment if len(sizes) > 1 else fragment
    valid_body = encode_message(f.part(0))
    return {
        "valid": f.stream(),
        "wrong_run": f.first_changed(run_id="another-run"),
        "wrong_stage": f.first_changed(stage=f.stage + 1),
        "absurd_stage": f.first_changed(stage=MAX_INT),
        "no_such_fragment": f.first_changed(fragment_id=len(sizes)),
        "absurd_fragment": f.first_changed(fragment_id=MAX_INT),
        "wrong_fragment_size": f.first_changed(fragment_id=other) if other != fragment else b"",
        "wrong_total": f.first_changed(total_values=total + per_part),
        "wrong_codec": f.first_changed(codec="int8" if f.codec != "int8" else "fp32"),
        "wrong_num_parts": f.first_changed(num_parts=num_parts + 1),
        "wrong_offset": f.first_changed(offset=1, values=floats((min(per_part, total - 1),), 0)) if total > 1 else b"",
        "short_part": f.first_changed(values=floats((min(per_part, total) - 1,), 0)) if total > 1 else b"",
        "part_index": f.stream(encode_message(f.part(1))) if num_parts > 1 else b"",
        "absurd_round": f.stream(encode_message(f.part(0, round_id=MAX_INT)),
                                 *[f.part(i, round_id=MAX_INT) for i in range(1, num_parts)]),
        "mixed_rounds": f.stream(None, *[f.part(i, round_id=f.round_id + 1) for i in range(1, num_parts)])
        if num_parts > 1 else b"",
        "duplicate_part": f.stream(None, f.part(0)) if num_parts > 1 else b"",
        "weight_zero": f.stream(with_header(valid_body, lambda h: h.__setitem__("weight", 0.0))),
        "weight_nan": f.stream(with_header(valid_body, lambda h: h.__setitem__("weight", float("nan")))),
        "weight_huge": f.stream(with_header(valid_body, lambda h: h.__setitem__("weight", 1e13))),
        "other_kind": f.stream(encode_message(StateRequest(run_id=f.run_id, stage=f.stage))),
        "then_garbage": f.stream(None, after=encode_frame(rng.randbytes(100))) if num_parts == 1 else b"",
    }


def exchange_corpus(rng: random.Random, run_id: str, stage: int, sizes: list[int], per_part: int,
                    key: tuple[int, int], codec: str = "e3m0", *, large: bool = False,
                    mutations: int = 16) -> list[Case]:
    """Cases for the fragment exchange (swarm/exchange/star.py); ``key`` = (fragment, round) of a round whose
    group the fuzzing peer leads, so a fully valid fragment is answered ``not_leader`` at once."""
    fragment, round_id = key
    f = FragmentStream(run_id, stage, fragment, round_id, sizes[fragment], per_part, codec)
    valid_body = encode_message(f.part(0))
    cases = [Case(f"semantic_{name}", data) for name, data in _exchange_semantic(rng, f, sizes).items() if data]
    cases += [
        Case("member_refusal", encode_frame(encode_message(ErrorReply(code="busy", message="not now")))),
        Case("left_mid_fragment", encode_frame(valid_body), close=True) if f.num_parts > 1 else
        Case("left_after_fragment", encode_frame(valid_body), close=True),
        Case("truncated_part", f.stream()[: -rng.randint(1, 40)], close=True),
    ]
    # Damage to part 0; the other parts follow it where the damaged frame still starts like a frame.
    rest = b"".join(encode_frame(encode_message(f.part(i))) for i in range(1, f.num_parts))
    one = [Case(c.family, c.data + (rest if not c.close and c.data.startswith(MAGIC) else b""), c.close)
           for c in non_finite_cases(lambda c: f.part(0, codec=c), "values")
           + tensor_cases(valid_body, "values", integer=False)
           + header_cases(rng, [valid_body], 12) + mutation_cases(rng, [valid_body], mutations)]
    cases += one + framing_cases(rng, [valid_body], WireLimits())
    if large:
        cases += [Case("large_garbage", encode_frame(rng.randbytes(LARGE_BYTES))),
                  Case("large_part", encode_frame(encode_message(f.part(0, values=floats((4 * LARGE_BYTES // 4,), 3),
                                                                        total_values=4 * LARGE_BYTES // 4,
                                                                        codec="e3m0"))))]
    return cases
