"""Next-hop replica choice: earliest expected finish, bans with backoff, soft busy (fake clock, no network)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from swarm.routing import Router


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _router(clock: FakeClock, **kwargs) -> Router:
    return Router(clock=clock, seed=0, **kwargs)


def test_prefers_the_faster_peer(clock):
    router = _router(clock)
    router.update([("slow", 1.0), ("fast", 4.0)])
    assert router.choose() == "fast"
    assert router.expected_finish("fast") == pytest.approx(0.25)
    # Measurements overrule announcements: "fast" turns out slow.
    router.started("fast")
    router.succeeded("fast", 3.0)
    router.started("slow")
    router.succeeded("slow", 0.5)
    assert router.choose() == "slow"


def test_service_time_first_sample_replaces_then_ema_blends(clock):
    router = _router(clock, ema=0.25)
    router.update([("a", 10.0)])
    router.succeeded("a", 2.0)
    assert router.snapshot()[0]["service_s"] == pytest.approx(2.0)
    router.succeeded("a", 6.0)
    assert router.snapshot()[0]["service_s"] == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    # Once measured, a new announcement no longer moves the estimate.
    router.update([("a", 100.0)])
    assert router.snapshot()[0]["service_s"] == pytest.approx(3.0)


def test_unmeasured_peer_follows_its_latest_announcement(clock):
    router = _router(clock)
    router.update([("a", 2.0)])
    router.update([("a", 5.0)])
    assert router.expected_finish("a") == pytest.approx(0.2)


def test_two_equal_peers_alternate_as_inflight_grows(clock):
    router = _router(clock)
    router.update([("a", 2.0), ("b", 2.0)])
    picks = []
    for _ in range(10):
        peer = router.choose()
        router.started(peer)
        picks.append(peer)
    # Every consecutive pair holds both peers: the second pick always goes to the idle one.
    for i in range(0, 10, 2):
        assert set(picks[i : i + 2]) == {"a", "b"}
    assert router.expected_finish("a") == pytest.approx(0.5 * 6)


def test_load_spreads_in_proportion_to_speed(clock):
    router = _router(clock)
    router.update([("fast", 2.0), ("slow", 1.0)])  # 0.5 s vs 1.0 s
    counts = Counter()
    for _ in range(9):
        peer = router.choose()
        router.started(peer)
        counts[peer] += 1
    assert counts == {"fast": 6, "slow": 3}


def test_reported_queue_repels_and_drains(clock):
    router = _router(clock)
    router.update([("a", 1.0), ("b", 1.0)])
    router.started("a")
    router.succeeded("a", 1.0, queue=4)
    assert router.expected_finish("a") == pytest.approx(5.0)
    assert router.choose() == "b"
    clock.advance(3.0)  # drains at one request per service time
    assert router.expected_finish("a") == pytest.approx(2.0)
    clock.advance(10.0)
    assert router.expected_finish("a") == pytest.approx(1.0)
    # Our own in-flight count wins when it is the larger backlog.
    router.succeeded("a", 1.0, queue=1)
    for _ in range(3):
        router.started("a")
    assert router.expected_finish("a") == pytest.approx(4.0)


def test_new_peer_is_routable_immediately_with_a_sensible_estimate(clock):
    router = _router(clock)
    assert router.choose() is None
    router.update([("a", 0.0)])  # nothing known: 1 s
    assert router.expected_finish("a") == pytest.approx(1.0)
    assert router.choose() == "a"
    router.update([("a", 0.0), ("b", 4.0), ("c", 2.0), ("d", float("nan")), ("e", 5e-324)])
    assert router.peers == ["a", "b", "c", "d", "e"]
    assert router.choose() == "b"
    # No usable rate: median of the listed estimates (1.0, 0.25, 0.5).
    assert router.expected_finish("d") == pytest.approx(0.5)
    assert router.expected_finish("e") == pytest.approx(0.5)
    assert router.choose(exclude={"a", "b", "c", "d"}) == "e"
    router.update([("a", 0.0), ("b", 4.0), ("c", 2.0), ("d", 0.0), ("f", 100.0)])
    assert router.choose() == "f"


def test_unmeasured_peer_is_tried_even_when_the_measured_one_is_faster_than_announced(clock):
    # One request in flight at a time (CI failure of the pipeline flow test): "a" answers in 50 ms, far
    # faster than both announced 1/s; "b" must still get work without another update() call.
    router = _router(clock)
    router.update([("a", 1.0), ("b", 1.0)])
    seen = Counter()
    for _ in range(40):
        peer = router.choose()
        seen[peer] += 1
        router.started(peer)
        clock.advance(0.05)
        router.succeeded(peer, 0.05 if peer == "a" else 0.08)
    assert seen["a"] > 0 and seen["b"] > 0, seen
    # Once measured, "b" is slower and gets less of the traffic from then on.
    assert router.expected_finish("b") > router.expected_finish("a")
    assert router.snapshot()[0]["peer_id"] == "a"


def test_banned_peer_is_skipped_until_the_ban_ends(clock):
    router = _router(clock, ban_base_s=2.0)
    router.update([("fast", 10.0), ("slow", 1.0)])
    router.started("fast")
    router.failed("fast", hard=True)
    assert router.banned("fast") and router.banned_until("fast") == pytest.approx(clock.now + 2.0)
    assert router.choose() == "slow"
    clock.advance(1.99)
    assert router.choose() == "slow"
    clock.advance(0.01)
    assert not router.banned("fast") and router.banned_until("fast") is None
    assert router.choose() == "fast"


def test_backoff_doubles_caps_and_resets_on_success(clock):
    router = _router(clock, ban_base_s=2.0, ban_max_s=20.0)
    router.update([("a", 1.0)])
    bans = []
    for _ in range(6):
        router.failed("a", hard=True)
        bans.append(router.banned_until("a") - clock.now)
        assert router.snapshot()[0]["banned_for_s"] == pytest.approx(bans[-1])
        clock.advance(bans[-1])
    assert bans == pytest.approx([2.0, 4.0, 8.0, 16.0, 20.0, 20.0])
    assert router.snapshot()[0]["strikes"] == 6
    router.succeeded("a", 1.0)
    assert router.snapshot()[0]["strikes"] == 0
    router.failed("a", hard=True)
    assert router.banned_until("a") - clock.now == pytest.approx(2.0)


def test_failures_during_a_ban_are_the_same_incident(clock):
    router = _router(clock, ban_base_s=2.0)
    router.update([("a", 1.0)])
    for _ in range(5):
        router.started("a")
    for _ in range(5):  # everything in flight fails when the peer drops
        router.failed("a", hard=True)
    assert router.snapshot()[0]["strikes"] == 1
    assert router.banned_until("a") - clock.now == pytest.approx(2.0)
    assert router.snapshot()[0]["inflight"] == 0


def test_exclude(clock):
    router = _router(clock)
    router.update([("a", 4.0), ("b", 2.0), ("c", 1.0)])
    assert router.choose(exclude={"a"}) == "b"
    assert router.choose(exclude=("a", "b")) == "c"
    assert router.choose(exclude=["a", "b", "c"]) is None


def test_none_when_everything_is_banned_excluded_or_empty(clock):
    router = _router(clock)
    assert router.choose() is None
    router.update([("a", 1.0), ("b", 1.0)])
    router.failed("a", hard=True)
    assert router.choose() == "b"
    assert router.choose(exclude={"b"}) is None
    router.failed("b", hard=True)
    assert router.choose() is None
    router.update([])
    clock.advance(100.0)
    assert router.choose() is None and router.peers == []


def test_busy_is_soft(clock):
    router = _router(clock)
    router.update([("a", 1.0), ("b", 1.0)])
    router.started("a")
    router.failed("a", hard=False)
    assert not router.banned("a")
    row = next(r for r in router.snapshot() if r["peer_id"] == "a")
    assert row["strikes"] == 0 and row["inflight"] == 0 and row["service_s"] == pytest.approx(1.0)
    assert row["queue"] == pytest.approx(1.0)
    assert [router.choose() for _ in range(5)] == ["b"] * 5
    # Busy again adds up; nothing but others is chosen while that lasts.
    router.failed("a", hard=False)
    assert router.expected_finish("a") == pytest.approx(3.0)
    assert router.choose(exclude={"b"}) == "a"  # still routable: busy never bans


def test_stray_calls_are_harmless_and_inflight_never_goes_negative(clock):
    router = _router(clock)
    for call in (lambda: router.started("ghost"), lambda: router.succeeded("ghost", 1.0),
                 lambda: router.failed("ghost", hard=True), lambda: router.failed("ghost", hard=False)):
        call()
    assert not router.banned("ghost") and router.banned_until("ghost") is None
    assert router.expected_finish("ghost") == math.inf
    router.update([("a", 1.0)])
    router.started("a")
    router.succeeded("a", 1.0)
    router.succeeded("a", 1.0)
    router.failed("a", hard=False)
    router.failed("a", hard=True)
    clock.advance(60.0)
    assert router.snapshot()[0]["inflight"] == 0
    router.started("a")
    assert router.expected_finish("a") == pytest.approx(2.0)  # 1 in flight, not 0


def test_bad_inputs(clock):
    router = _router(clock)
    router.update([("a", 1.0)])
    with pytest.raises(ValueError):
        router.succeeded("a", float("nan"))
    with pytest.raises(ValueError):
        router.succeeded("a", -1.0)
    router.succeeded("a", 1.0, queue=-5)  # peer-reported nonsense is clamped, not trusted
    assert router.expected_finish("a") == pytest.approx(1.0)
    for kwargs in ({"ban_base_s": 0.0}, {"ban_max_s": 1.0}, {"ema": 0.0}, {"ema": 1.5}, {"forget_s": -1.0}):
        with pytest.raises(ValueError):
            Router(**kwargs)


def test_removed_peer_is_not_chosen_and_keeps_its_measurement(clock):
    router = _router(clock)
    router.update([("a", 10.0), ("b", 1.0)])
    router.started("a")
    router.succeeded("a", 0.2)
    router.update([("b", 1.0)])
    assert router.peers == ["b"]
    assert [router.choose() for _ in range(3)] == ["b"] * 3
    assert [r["peer_id"] for r in router.snapshot()] == ["b"]
    router.succeeded("a", 0.2)  # a late reply from the dropped peer is harmless
    router.update([("a", 1.0), ("b", 1.0)])
    assert router.expected_finish("a") == pytest.approx(0.2)  # measured, not the 1.0 announced


def test_reappearing_banned_peer_is_still_banned(clock):
    router = _router(clock, ban_base_s=10.0, forget_s=1.0)
    router.update([("a", 10.0), ("b", 1.0)])
    router.failed("a", hard=True)
    router.update([("b", 1.0)])
    clock.advance(5.0)  # past forget_s, but the ban keeps it remembered
    router.update([("b", 1.0)])
    router.update([("a", 10.0), ("b", 1.0)])
    assert router.banned("a") and router.choose() == "b"
    clock.advance(5.0)
    assert router.choose() == "a"
    # Its strike record survived too: the next failure bans for twice as long.
    router.failed("a", hard=True)
    assert router.banned_until("a") - clock.now == pytest.approx(20.0)


def test_dropped_peer_is_forgotten_after_forget_s(clock):
    router = _router(clock, forget_s=30.0)
    router.update([("a", 1.0)])
    router.succeeded("a", 0.1)
    router.update([])
    clock.advance(29.0)
    router.update([])
    assert router.expected_finish("a") == pytest.approx(0.1)
    clock.advance(1.0)
    router.update([])
    assert router.expected_finish("a") == math.inf
    router.update([("a", 1.0)])
    assert router.expected_finish("a") == pytest.approx(1.0)


def test_ties_are_broken_at_random_but_reproducibly(clock):
    def picks(seed: int) -> list[str]:
        router = Router(clock=clock, seed=seed)
        router.update([("c", 1.0), ("a", 1.0), ("b", 1.0)])
        return [router.choose() for _ in range(30)]

    assert picks(7) == picks(7)
    assert set(picks(7)) == {"a", "b", "c"}
    assert {picks(seed)[0] for seed in range(40)} == {"a", "b", "c"}



def test_a_peer_measured_slow_once_is_measured_again_not_starved(clock):
    """A replica measured slow once (its backlog after a freeze, a cold start) is not chosen while a fast one
    absorbs the load, so its estimate would never be refreshed. Idle for reprobe_s, it gets the next request,
    and that reply replaces its estimate: taken back at its real speed, or probed now and then if slow."""
    router = _router(clock, reprobe_s=5.0)
    router.update([("once_slow", 1.0), ("fast", 1.0)])
    for peer, seconds in (("fast", 0.1), ("once_slow", 2.0)):
        router.started(peer)
        router.succeeded(peer, seconds)
    took = {"fast": 0.1, "once_slow": 2.0}

    def sender(seconds: float) -> list[str]:
        """Every 0.05 s one request to whichever is chosen, answered within the step, as fast as it says."""
        chosen = []
        for _ in range(round(seconds / 0.05)):
            peer = router.choose()
            chosen.append(peer)
            router.started(peer)
            clock.advance(0.05)
            router.succeeded(peer, took[peer])
        return chosen

    assert set(sender(4.0)) == {"fast"}  # slow by 20x: not a good bet
    # Still slow: one request every reprobe_s (+ a step), the rest to the fast one.
    assert sender(20.0).count("once_slow") in (3, 4)
    assert next(r for r in router.snapshot() if r["peer_id"] == "once_slow")["service_s"] == pytest.approx(2.0)
    took["once_slow"] = 0.05  # it recovered: the next probe's reply replaces the old estimate (no slow average)
    recovered = sender(10.0)
    assert next(r for r in router.snapshot() if r["peer_id"] == "once_slow")["service_s"] < 0.1
    assert recovered[-20:].count("once_slow") >= 10  # the faster of the two now: it takes the load


def test_choosing_alone_probes_nothing_and_a_busy_peer_is_not_stale(clock):
    router = _router(clock, reprobe_s=1.0)
    router.update([("slow", 1.0), ("fast", 1.0)])
    for peer, seconds in (("fast", 0.1), ("slow", 4.0)):
        router.started(peer)
        router.succeeded(peer, seconds)
    router.started("fast")
    clock.advance(10.0)
    assert [router.choose() for _ in range(5)] == ["slow"] * 5  # idle 10 s: stale (choose records nothing)
    router.started("slow")  # the probe is out: no second one until it answers
    assert router.choose() == "fast"
    router.failed("slow", hard=False)  # busy: not a measurement, the old estimate stays
    assert next(r for r in router.snapshot() if r["peer_id"] == "slow")["service_s"] == pytest.approx(4.0)


def test_reprobe_s_must_be_positive(clock):
    with pytest.raises(ValueError, match="reprobe_s"):
        _router(clock, reprobe_s=0.0)
