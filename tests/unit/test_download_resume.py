"""State downloads made for home links, without a network: chunks kept on disk and resumed from,
deadlines sized from the state and the measured rate (fake clocks), progress reports.

The donor is a fake stream endpoint (tests/download_util.py) that answers with a real encoded state,
so the real client code (swarm/state_transfer.py, swarm/state_fetch.py, swarm/chunk_cache.py) runs
unchanged; it can cut the link at a given chunk or stall.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from download_util import CHUNK, RUN, FakeDonor, FakeP2P

from swarm.chunk_cache import ChunkCache
from swarm.state_codec import StageSnapshot
from swarm.state_transfer import StateTransferError, download_from_replicas, download_stage_state
from swarm.transfer_pace import MBIT, TransferPace, format_duration


def _snap(seed: int = 0) -> StageSnapshot:
    g = torch.Generator().manual_seed(seed)
    return StageSnapshot(stage=1, step=7 + seed, round_id=0, tensors={
        "w": torch.randn(2000, generator=g), "b": torch.randn(37, generator=g).half(),
        "n": torch.arange(5, dtype=torch.int64)})


def _equal(got: StageSnapshot, want: StageSnapshot) -> bool:
    return got.step == want.step and all(torch.equal(got.tensors[k], t) for k, t in want.tensors.items())


def _download(p2p, peer="A", **kwargs) -> StageSnapshot:
    return asyncio.run(download_stage_state(p2p, peer, RUN, 1, timeout=None, **kwargs))


# -------------------------------------------------------------------------------------- resume


def test_a_cut_download_resumes_from_the_verified_chunks_on_disk(tmp_path, monkeypatch):
    snap, cache = _snap(), ChunkCache(tmp_path / "all")
    donor = FakeDonor(snap, cut_at=5)
    p2p = FakeP2P(monkeypatch, {"A": donor})
    n = len(donor.manifest.chunk_sha256)
    with pytest.raises(StateTransferError) as cut:
        _download(p2p, cache=cache)
    assert cut.value.reason == "connection" and donor.sent == [0, 1, 2, 3, 4]
    assert cache.chunks() == 5  # every verified chunk is on disk

    donor.cut_at, donor.sent = None, []
    progress = []
    got = _download(p2p, cache=cache, pace=TransferPace(on_progress=lambda p: progress.append(p.view())))
    assert _equal(got, snap)
    assert donor.sent == list(range(5, n))  # the kept chunks were not fetched again
    assert progress[0]["kept_bytes"] == 5 * CHUNK and progress[-1]["done_bytes"] == donor.manifest.total_bytes


def test_a_damaged_kept_chunk_is_fetched_again_and_other_states_chunks_are_dropped(tmp_path, monkeypatch):
    snap, cache = _snap(), ChunkCache(tmp_path / "all")
    donor = FakeDonor(snap, cut_at=4)
    p2p = FakeP2P(monkeypatch, {"A": donor})
    with pytest.raises(StateTransferError):
        _download(p2p, cache=cache)
    damaged = cache.directory / donor.manifest.chunk_sha256[2]
    damaged.write_bytes(b"\x00" + damaged.read_bytes()[1:])  # a bad disk: same length, other bytes
    stray = cache.directory / ("e" * 64)  # a chunk of another state
    stray.write_bytes(b"x" * CHUNK)
    torn = cache.directory / (".tmp-" + "f" * 64)  # a write a kill interrupted
    torn.write_bytes(b"y")

    donor.cut_at, donor.sent = None, []
    assert _equal(_download(p2p, cache=cache), snap)
    assert donor.sent[0] == 2 and 0 not in donor.sent and 3 not in donor.sent  # only the damaged one again
    assert not stray.exists() and not torn.exists()


def test_chunks_of_a_state_that_moved_on_are_used_where_they_still_match(tmp_path, monkeypatch):
    """The donor trained on: a new digest, but chunks whose bytes did not change are not fetched again."""
    old, cache = _snap(), ChunkCache(tmp_path / "all")
    new = StageSnapshot(stage=1, step=old.step + 1, round_id=0, tensors={**old.tensors, "n": old.tensors["n"] + 1})
    donor = FakeDonor(old)
    p2p = FakeP2P(monkeypatch, {"A": donor})
    _download(p2p, cache=cache)  # a complete download (the node would clear the directory after loading)
    p2p.donors["A"] = moved = FakeDonor(new)
    assert moved.manifest.digest != donor.manifest.digest
    assert _equal(_download(p2p, cache=cache), new)
    assert moved.sent == [len(moved.manifest.chunk_sha256) - 1]  # "n" sits in the last chunk only
    assert cache.chunks() == len(moved.manifest.chunk_sha256)  # the old last chunk was dropped


def test_a_cache_that_cannot_write_never_fails_the_download(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ChunkCache(blocker / "all")
    p2p = FakeP2P(monkeypatch, {"A": FakeDonor(_snap())})
    with caplog.at_level(logging.WARNING):
        assert _equal(_download(p2p, cache=cache), _snap())
    assert cache.broken and "cannot keep downloaded chunks" in caplog.text


def test_the_consensus_download_resumes_too(tmp_path, monkeypatch):
    snap, cache = _snap(), ChunkCache(tmp_path / "consensus")
    a, b = FakeDonor(snap, cut_at=3, part="consensus"), FakeDonor(snap, cut_at=3, part="consensus")
    p2p = FakeP2P(monkeypatch, {"A": a, "B": b})
    with pytest.raises(StateTransferError) as cut:
        asyncio.run(download_from_replicas(p2p, ["A", "B"], RUN, 1, timeout=None, cache=cache))
    assert cut.value.reason == "donors_left"
    before, n = set(a.sent) | set(b.sent), len(a.manifest.chunk_sha256)
    assert len(before) == 3 and cache.chunks() == 3  # chunks 0-2: both donors dropped at chunk 3
    a.cut_at, b.cut_at, a.sent, b.sent = None, None, [], []
    got, served = asyncio.run(download_from_replicas(p2p, ["A", "B"], RUN, 1, timeout=None, cache=cache))
    assert _equal(got, snap)
    assert sorted(a.sent + b.sent) == sorted(set(range(n)) - before)  # nothing verified before was asked again
    assert sum(served.values()) == n - len(before)


# -------------------------------------------------------------------------------------- pace


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_is_sized_from_the_state_and_the_measured_rate():
    pace = TransferPace(stall_s=60, floor_bytes_s=MBIT, margin=3)
    gb8 = 8_000_000_000
    assert pace.deadline_s(gb8, 0, 0) == pytest.approx(60 + 8e9 / 125_000 * 3)  # nothing measured: the floor
    # 80 Mbit/s measured (10 MB/s): the whole state's deadline is 3 × 800 s, plus the stall window.
    assert pace.deadline_s(gb8, 100_000_000, 10.0) == pytest.approx(60 + 2400)
    assert pace.deadline_s(gb8, 1000, 10.0) == pace.deadline_s(gb8, 0, 0)  # slower than the floor: the floor
    with pytest.raises(ValueError):
        TransferPace(margin=0.5)


def test_progress_rate_eta_and_a_transfer_that_trickles_below_the_floor(caplog):
    clock, seen = FakeClock(), []
    pace = TransferPace(stall_s=10, floor_bytes_s=1e6, margin=2, report_every_s=3, clock=clock,
                        on_progress=lambda p: seen.append(p.describe()))
    progress = pace.start(stage=0, part="all", total=100_000_000, source="A")
    progress.resumed(20_000_000, 2)  # 20 MB verified on disk: only 80 MB to fetch
    assert progress.eta_s() is None and not progress.overdue()
    clock.now += 4
    with caplog.at_level(logging.INFO, logger="swarm.transfer_pace"):
        progress.add(40_000_000)  # 10 MB/s, above the floor: the deadline follows the rate
    assert progress.rate() == 10e6 and progress.eta_s() == pytest.approx(4.0)
    assert progress.deadline_s() == pytest.approx(10 + 80e6 / 10e6 * 2)
    assert seen[-1] == "60.0/100.0 MB (60%), 10.00 MB/s, ETA 4 s (20.0 MB from disk)"
    assert "stage 0: downloading the whole state from A: 60.0/100.0 MB" in caplog.text  # the periodic log line
    clock.now += 200  # then a trickle: the attempt's rate falls under the 1 MB/s floor ...
    progress.add(100)
    # ... and it has run longer than its 80 MB need at the floor (10 + 80 s × 2 = 170 s < 204 s).
    assert progress.rate() < 1e6 and progress.deadline_s() == pytest.approx(170) and progress.overdue()
    err = progress.too_slow()
    assert err.reason == "too_slow" and "deadline for this state at the 8 Mbit/s floor is 170 s" in str(err)


def test_a_stalled_or_trickling_download_fails_with_a_named_reason(tmp_path, monkeypatch):
    p2p = FakeP2P(monkeypatch, {"A": FakeDonor(_snap(), stall_at=2)})
    with pytest.raises(StateTransferError, match="stalled: no verified bytes within 5 s") as info:
        _download(p2p, pace=TransferPace(stall_s=5))
    assert info.value.reason == "timeout"

    clock = FakeClock()
    p2p.donors["A"] = donor = FakeDonor(_snap())
    orig = donor.request

    async def slow(*args, **kwargs):  # each chunk takes 100 s of the fake clock: 10 B/s, under a 1 kB/s floor
        clock.now += 100
        return await orig(*args, **kwargs)

    donor.request = slow
    with pytest.raises(StateTransferError, match="too slow") as info:
        _download(p2p, pace=TransferPace(stall_s=5, floor_bytes_s=1000, margin=1, clock=clock))
    assert info.value.reason == "too_slow" and len(donor.sent) < len(donor.manifest.chunk_sha256)


def test_durations_read_well():
    assert [format_duration(s) for s in (42, 840, 12_600)] == ["42 s", "14 min", "3.5 h"]
