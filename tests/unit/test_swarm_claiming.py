"""Stage choice and rebalancing policy (pure functions over records)."""

from __future__ import annotations

from protocol.messages import StageRecord
from swarm.claiming import (
    choose_stage,
    coverage_gap,
    mover_of_round,
    rebalance_target,
    stage_loads,
    stage_server_ids,
    stage_servers,
)


def _rec(peer: str, stage: int, throughput: float, state: str = "online") -> StageRecord:
    return StageRecord(peer_id=peer, run_id="r", stage=stage, num_stages=3, state=state, throughput=throughput)


def test_loads_count_serving_peers_only_and_can_exclude_oneself():
    records = {0: [_rec("a", 0, 2.0), _rec("b", 0, 1.0, "offline")], 1: [_rec("c", 1, 3.0, "joining")], 2: []}
    assert stage_loads(records, 3) == [2.0, 3.0, 0.0]
    assert stage_loads(records, 3, exclude_peer="a") == [0.0, 3.0, 0.0]
    assert stage_servers(records, 3) == [1, 1, 0]


def test_joiners_fill_empty_stages_first_then_the_weakest():
    assert choose_stage([5.0, 0.0, 1.0], [2, 0, 1], "p") == 1  # empty beats low load
    assert choose_stage([5.0, 3.0, 1.0], [2, 1, 1], "p") == 2
    # All empty: different peers spread over the stages instead of all taking stage 0.
    picks = {choose_stage([0.0] * 4, [0] * 4, f"peer-{i}") for i in range(40)}
    assert picks == {0, 1, 2, 3}


def test_joiners_arriving_together_spread_over_stages_whose_loads_differ_by_noise():
    # Every stage covered, loads within the gain factor of the lowest: a strict minimum sent all 40
    # joiners to stage 1; within the tolerance they spread out.
    loads, servers = [3.0, 2.9, 3.1, 3.0], [1, 1, 1, 1]
    assert {choose_stage(loads, servers, f"peer-{i}") for i in range(40)} == {1}
    picks = [choose_stage(loads, servers, f"peer-{i}", tolerance=1.2) for i in range(40)]
    assert set(picks) == {0, 1, 2, 3} and max(picks.count(s) for s in range(4)) < 20
    # A real difference still decides: only stages within 1.2× of the lowest are candidates.
    assert {choose_stage([3.0, 1.0, 3.1, 1.15], servers, f"peer-{i}", tolerance=1.2) for i in range(40)} == {1, 3}
    assert {choose_stage([3.0, 1.0, 3.1, 2.0], servers, f"peer-{i}", tolerance=1.2) for i in range(40)} == {1}
    # Coverage first, whatever the tolerance: the band is taken within the best-covered stages only.
    assert {choose_stage([9.0, 0.5, 9.0], [1, 2, 1], f"peer-{i}", 2, tolerance=1.2) for i in range(40)} == {0, 2}
    assert {choose_stage([0.0, 0.0, 0.0], [0, 1, 0], f"peer-{i}", tolerance=1.2) for i in range(40)} == {0, 2}


def test_an_empty_stage_is_refilled_unless_that_empties_ours():
    assert rebalance_target([4.0, 0.0], [2, 0], current=0, my_throughput=2.0, gain=1.2) == 1
    assert rebalance_target([0.0, 0.0], [0, 0], current=0, my_throughput=2.0, gain=1.2) is None


def test_moves_need_the_gain_factor():
    # Stage 0 has me (2) + 6, stage 1 has 2: moving makes the bottleneck 4 instead of 2.
    assert rebalance_target([6.0, 2.0], [3, 1], current=0, my_throughput=2.0, gain=1.2) == 1
    # 3 + me vs 2.9: moving gives min(3, 4.9) = 3 vs 2.9 now: < 1.2×, stay.
    assert rebalance_target([3.0, 2.9], [1, 1], current=0, my_throughput=2.0, gain=1.2) is None
    # Balanced: nobody moves.
    assert rebalance_target([2.0, 4.0], [1, 2], current=0, my_throughput=2.0, gain=1.0) is None


def test_a_crowded_stage_sheds_nodes_while_two_stages_tie_at_the_bottom():
    # Me + 7 on stage 0, the other three at 2.0: no single move raises the bottleneck (two stages stay
    # at 2.0), which kept the crowd in place under the bottleneck rule; now I go to the lightest stage.
    assert rebalance_target([7.0, 2.0, 2.0, 2.0], [7, 2, 2, 2], current=0, my_throughput=1.0, gain=1.2) == 1
    assert rebalance_target([7.0, 2.5, 2.0, 2.2], [7, 2, 2, 2], current=0, my_throughput=1.0, gain=1.2) == 2
    # However small this node's share: a stage of many nodes stays movable (2.0 → 2.3 is under 1.2×,
    # which froze the swarm under a rule on the lighter stage's gain).
    assert rebalance_target([7.0, 2.0, 2.0, 2.0], [7, 2, 2, 2], current=0, my_throughput=0.3, gain=1.2) == 1
    # The target must be clearly lighter than what stays behind: 2.3 < 1.2 × 2.0.
    assert rebalance_target([2.3, 2.0], [2, 2], current=0, my_throughput=1.0, gain=1.2) is None
    assert rebalance_target([2.3, 2.0], [2, 2], current=0, my_throughput=0.0, gain=1.0) is None
    # Leaving must not take my stage below the target's load now.
    assert rebalance_target([1.5, 2.0], [1, 1], current=0, my_throughput=3.0, gain=1.2) is None


def test_a_lighter_stage_this_node_cannot_take_does_not_hide_one_it_can():
    # Stage 1 is the lightest but does not fit this device (or its servers could not give it): stage 2, also
    # clearly lighter than what stays behind, is the move; before, the node stayed put.
    assert rebalance_target([7.0, 1.0, 2.0], [7, 1, 2], current=0, my_throughput=1.0, gain=1.2) == 1
    assert rebalance_target([7.0, 1.0, 2.0], [7, 1, 2], current=0, my_throughput=1.0, gain=1.2, allowed=[0, 2]) == 2
    assert rebalance_target([7.0, 1.0, 2.0], [7, 1, 2], current=0, my_throughput=1.0, gain=1.2, allowed=[0]) is None
    # Coverage first, among the allowed stages too: an empty stage this node cannot take is not a target.
    assert rebalance_target([4.0, 0.0, 1.0], [2, 0, 1], current=0, my_throughput=1.0, gain=1.2, allowed={0, 2}) == 2


def _view(stage_of: list[int], throughput: list[float], stages: int, skip: int) -> tuple[list[float], list[int]]:
    """Loads and servers per stage, node ``skip`` left out."""
    loads, servers = [0.0] * stages, [0] * stages
    for i, s in enumerate(stage_of):
        if i != skip:
            loads[s] += throughput[i]
            servers[s] += 1
    return loads, servers


def test_rebalancing_settles_and_never_lowers_the_bottleneck():
    import random

    rng = random.Random(7)
    for _ in range(200):
        stages, nodes = rng.randint(2, 6), rng.randint(2, 24)
        throughput = [rng.lognormvariate(0.0, 0.7) for _ in range(nodes)]
        stage_of = [rng.randrange(stages) if rng.random() < 0.5 else 0 for _ in range(nodes)]
        min_replicas = rng.choice([1, 2])

        moves = 0
        for _ in range(1000):
            moved = False
            for i in rng.sample(range(nodes), nodes):
                loads, servers = _view(stage_of, throughput, stages, i)
                target = rebalance_target(loads, servers, stage_of[i], throughput[i], 1.2, min_replicas)
                if target is not None:
                    before = _view(stage_of, throughput, stages, -1)
                    stage_of[i], moved, moves = target, True, moves + 1
                    after = _view(stage_of, throughput, stages, -1)
                    gaps = coverage_gap(before[1], min_replicas), coverage_gap(after[1], min_replicas)
                    assert gaps[1] <= gaps[0]
                    if gaps[1] == gaps[0]:  # a move for throughput, not coverage: the bottleneck only rises
                        assert min(after[0]) >= min(before[0]) - 1e-12
            if not moved:
                break
        assert not moved, f"still moving after {moves} moves"


def test_coverage_before_noisy_throughput():
    # One fast peer alone on stage 1, five slow ones on stage 0 (throughputs measured on a busy
    # machine): by load the split is fine, but stage 1 has a single replica. A stage-0 peer moves.
    assert rebalance_target([12.0, 20.0], [4, 1], current=0, my_throughput=3.0, gain=1.2, min_replicas=2) == 1
    # The lone stage-1 peer never leaves, whatever the loads.
    assert rebalance_target([15.0, 0.0], [5, 0], current=1, my_throughput=20.0, gain=1.2, min_replicas=2) is None
    # Once both stages hold two, the throughput rule may not undo it (stage 0 would drop to one).
    assert rebalance_target([20.0, 12.0], [1, 4], current=0, my_throughput=3.0, gain=1.2, min_replicas=2) is None
    # With min_replicas = 1 the same loads do move that peer: that is the gain rule.
    assert rebalance_target([20.0, 12.0], [1, 4], current=0, my_throughput=3.0, gain=1.2, min_replicas=1) == 1
    # Too few peers for the floor everywhere: moving between two under-filled stages changes nothing.
    assert rebalance_target([1.0, 1.0], [1, 1], current=0, my_throughput=1.0, gain=1.2, min_replicas=3) is None


def test_joiners_fill_stages_below_the_replica_floor_first():
    assert choose_stage([1.0, 9.0, 9.0], [1, 3, 3], "p", min_replicas=2) == 0
    assert choose_stage([1.0, 9.0, 9.0], [2, 3, 3], "p", min_replicas=2) == 0
    assert choose_stage([9.0, 1.0, 9.0], [3, 1, 3], "p", min_replicas=2) == 1
    assert choose_stage([9.0, 20.0, 9.0], [3, 1, 3], "p", min_replicas=2) == 1  # floor beats load


def test_a_restarted_node_returns_to_its_checkpointed_stage_unless_a_stage_is_empty():
    from swarm.claiming import prefer_own_stage

    assert prefer_own_stage(chosen=1, own=0, servers=[3, 1]) == 0  # stage 1 is thin, not empty: resume
    assert prefer_own_stage(chosen=1, own=0, servers=[3, 0]) == 1  # nobody serves stage 1: cover it
    assert prefer_own_stage(chosen=1, own=None, servers=[3, 1]) == 1  # no checkpoint: the usual pick
    assert prefer_own_stage(chosen=0, own=5, servers=[1, 1]) == 0  # a checkpoint of a stage the run lacks


def test_the_rounds_mover_is_one_peer_whatever_the_order_it_is_read_in_and_every_peer_takes_its_turn():
    """swarm/claiming.py ``mover_of_round``: the same peer for the same set and round (every server of a stage
    elects the same one), None for no servers, and over many rounds each peer about one round in k."""
    peers = [f"Qm{i}" for i in range(4)]
    assert mover_of_round([], 7) is None
    counts = dict.fromkeys(peers, 0)
    for r in range(1000):
        mover = mover_of_round(peers, r)
        assert mover == mover_of_round(reversed(peers), r) == mover_of_round(set(peers), r)
        counts[mover] += 1
    assert all(200 <= c <= 300 for c in counts.values()), counts
    # the candidates a node hands it: the stage's servers others can dial (behind NAT a pipeline peer never moves)
    recs = {0: [StageRecord(peer_id=p, run_id="r", stage=0, num_stages=2, state=st, reachable=reach)
                for p, st, reach in (("QmA", "online", "public"), ("QmB", "joining", "unknown"),
                                     ("QmC", "online", "private"), ("QmD", "offline", "public"))]}
    assert stage_server_ids(recs, 0) == {"QmA", "QmB", "QmC"} and stage_server_ids(recs, 0, dialable=True) == {"QmA", "QmB"}
    # a peer joining the stage changes who is elected in some rounds, not whether one is
    assert any(mover_of_round(peers, r) != mover_of_round([*peers, "QmNew"], r) for r in range(50))
