"""Cases and an oracle for the balanced exchange's handler (swarm/exchange/balanced.py,
``protoswarm.diloco.balanced.v2``). A member opens a stream to it in two ways:

- a *slice*: the FragmentParts of one slice of its fragment, sent to that slice's reducer or checker,
  which must hold an agreed roster of the round with the member in it;
- a *join*: one FragmentRequest to the group's leader, answered with the round's GroupRoster.

The oracle restates the handler's rules (it does not call the handler's code): what must be refused
and counted as a protocol error, what is a plain refusal, and what is held until the round ends.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from fuzz_corpus import FragmentStream, _exchange_semantic, floats
from fuzz_util import (
    MAX_INT,
    Case,
    Expect,
    first_frame,
    framing_cases,
    header_cases,
    mutation_cases,
    non_finite_cases,
)

from protocol.framing import MAGIC, PREFIX_BYTES, encode_frame
from protocol.messages import ErrorReply, FragmentPart, FragmentRequest, decode_message, encode_message
from protocol.streams import ProtocolError
from protocol.tensors import WireLimits

# Answers to a stream the node holds until its own round settles (it never runs one in the fuzz test).
HELD_SLICE = frozenset({"timeout", "late", "rejected", "skipped", "busy"})
HELD_JOIN = frozenset({"timeout", "late", "rejected", "busy", "not_leader"})
HELD_NO_ROSTER = frozenset({"late", "busy"})


@dataclass(frozen=True)
class SliceStream(FragmentStream):
    """The parts of one slice ``[start, start + length)`` of a fragment, as a member sends them."""

    start: int = 0
    length: int = 1

    @property
    def num_parts(self) -> int:
        return max(1, math.ceil(self.length / self.per_part))

    def part(self, index: int = 0, **changes) -> FragmentPart:
        offset = self.start + index * self.per_part
        n = max(0, min(self.per_part, self.start + self.length - offset))
        return dataclasses.replace(super().part(0), **{"part": index, "num_parts": self.num_parts, "offset": offset,
                                                       "values": floats((n,), index, 1e-3), **changes})


def balanced_corpus(rng: random.Random, f: SliceStream, sizes: list[int], join_round: int, *,
                    mutations: int = 12) -> list[Case]:
    """Slices (``f``: one this node serves the fuzzing peer in an agreed round) and joins (for
    ``join_round``, whose group the node leads)."""
    cases = [Case(f"slice_{name}", data) for name, data in _exchange_semantic(rng, f, sizes).items() if data]
    first = encode_message(f.part(0))
    rest = b"".join(encode_frame(encode_message(f.part(i))) for i in range(1, f.num_parts))
    damaged = (non_finite_cases(lambda c: f.part(0, codec=c), "values") + header_cases(rng, [first], 8)
               + mutation_cases(rng, [first], mutations))
    cases += [Case(c.family, c.data + (rest if not c.close and c.data.startswith(MAGIC) else b""), c.close)
              for c in damaged]
    cases += [Case("slice_left_mid_slice", encode_frame(first), close=True),
              Case("slice_truncated", f.stream()[: -rng.randint(1, 40)], close=True),
              Case("slice_refusal_first", encode_frame(encode_message(ErrorReply(code="busy", message="no"))))]
    if f.num_parts > 1:
        cases.append(Case("slice_refusal_mid", encode_frame(first) + encode_frame(
            encode_message(ErrorReply(code="busy", message="no")))))
    join = dict(run_id=f.run_id, stage=f.stage, round_id=join_round, fragment_id=f.fragment)
    body = encode_message(FragmentRequest(**join))
    for name, changes in {"valid": {}, "wrong_run": {"run_id": "another-run"}, "wrong_stage": {"stage": f.stage + 1},
                          "no_such_fragment": {"fragment_id": len(sizes)}, "absurd_fragment": {"fragment_id": MAX_INT},
                          "absurd_round": {"round_id": MAX_INT}}.items():
        cases.append(Case(f"join_{name}", encode_frame(encode_message(FragmentRequest(**{**join, **changes})))))
    cases += [Case("join_then_garbage", encode_frame(body) + encode_frame(rng.randbytes(64))),
              Case("join_left", encode_frame(body), close=True)]
    cases += [Case(f"join_{c.family}", c.data, c.close) for c in header_cases(rng, [body], 6)
              + mutation_cases(rng, [body], mutations // 2)]
    return cases + framing_cases(rng, [first, body], WireLimits())


@dataclass
class BalancedTarget:
    """What the node must answer: ``key`` (stage, fragment, round) is the round whose roster holds the
    fuzzing peer, ``slices`` the {offset: length} of the slices the node serves it in that round."""

    limits: WireLimits
    run_id: str
    stage: int
    sizes: list[int]
    per_part: int
    codec: str
    key: tuple[int, int, int]
    slices: dict[int, int]

    def oracle(self, case: Case) -> Expect:
        data = case.data
        what, value, _ = first_frame(data, self.limits, case.close)
        assert what != "wait", f"{case.family}: the node would wait for more bytes"
        if what == "end":
            return Expect(reply="none")
        if what == "error":
            return self._refused(value, case)
        try:
            msg = decode_message(value, self.limits)
        except ProtocolError as exc:
            return self._refused(exc.code, case)
        if isinstance(msg, FragmentRequest):
            if not self._ours(msg.run_id, msg.stage, msg.fragment_id):
                return self._refused("malformed", case)
            return self._held(HELD_JOIN, case)
        if not isinstance(msg, FragmentPart) or not self._ours(msg.run_id, msg.stage, msg.fragment_id):
            return self._refused("malformed", case)
        if msg.codec != self.codec or msg.total_values != self.sizes[msg.fragment_id]:
            return self._refused("malformed", case)  # checked before the node looks for the round's roster
        key = (msg.stage, msg.fragment_id, msg.round_id)
        if key != self.key:
            return self._held(HELD_NO_ROSTER, case)  # waits for a roster of that round; none comes
        start, length = msg.offset, self.slices.get(msg.offset)
        if length is None or msg.num_parts != math.ceil(length / self.per_part):
            return self._answer(frozenset({"not_leader"}), case)  # not a slice it serves (views differ)
        got, want = 0, msg.num_parts
        data = data[PREFIX_BYTES + len(value):]
        while True:
            problem = self._bad_part(msg, key, start, length, got)
            if problem:
                return self._refused(problem, case)
            got += 1
            if got == want:
                break
            what, value, _ = first_frame(data, self.limits, case.close)
            assert what != "wait", f"{case.family}: the node would wait for more bytes"
            if what == "end":
                return Expect(reply="none")  # the member left mid-slice: no reply, no strike
            if what == "error":
                return self._refused(value, case)
            data = data[PREFIX_BYTES + len(value):]
            try:
                msg = decode_message(value, self.limits)
            except ProtocolError as exc:
                return self._refused(exc.code, case)
            if isinstance(msg, ErrorReply):
                return Expect(reply="none")
            if not isinstance(msg, FragmentPart):
                return self._refused("malformed", case)
        return self._held(HELD_SLICE, case)

    def _ours(self, run_id: str, stage: int, fragment: int) -> bool:
        return run_id == self.run_id and stage == self.stage and 0 <= fragment < len(self.sizes)

    def _bad_part(self, msg: FragmentPart, key: tuple, start: int, length: int, index: int) -> str | None:
        at = start + index * self.per_part
        if msg.run_id != self.run_id or (msg.stage, msg.fragment_id, msg.round_id) != key:
            return "malformed"
        if msg.codec != self.codec or msg.total_values != self.sizes[key[1]]:
            return "malformed"
        if msg.num_parts != math.ceil(length / self.per_part) or msg.part != index or msg.offset != at or \
                msg.values.numel() != min(self.per_part, start + length - at):
            return "malformed"
        return None

    @staticmethod
    def _refused(code: str, case: Case) -> Expect:
        return Expect(codes=frozenset({code}), counted=code, reply="none" if case.close else "required")

    @staticmethod
    def _answer(codes: frozenset[str], case: Case) -> Expect:
        return Expect(codes=codes, reply="none" if case.close else "required")

    @staticmethod
    def _held(codes: frozenset[str], case: Case) -> Expect:
        return Expect(codes=codes, reply="none" if case.close else "held")
