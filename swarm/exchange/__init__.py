"""The fragment exchange: how the replicas of a stage average one fragment's outer gradients over
hivemind P2P (docs/diloco.md). Two exchanges plan the same groups and give the caller the same
:class:`RoundResult`; ``exchange.mode`` picks one for a run.

- ``swarm.exchange.config``     ``ExchangeConfig``, the ``[exchange]`` section (run-level and node-local fields).
- ``swarm.exchange.groups``     ``RoundKey``, ``RoundResult``; ``plan_groups`` (who averages with whom in a
  round), ``round_order`` and ``plan_slices`` (the balanced exchange's slices, reducers and checkers).
- ``swarm.exchange.transport``  parts on the wire: chunking, reading FragmentParts back with their checks,
  per-part rounding and the digests of the balanced exchange's summaries.
- ``swarm.exchange.star``       ``FragmentExchange``: a leader per group averages the whole fragment.
- ``swarm.exchange.balanced``   ``BalancedExchange``: one slice per member, each reduced by one member and
  checked by another (reduce-scatter / all-gather).
- ``swarm.exchange.roster``     the balanced exchange's first step: a leader fixes the round's group
  (``GroupRoster``) so members whose views of the stage differ still plan the same slices.
- ``swarm.exchange.checks``     what a balanced-exchange member verifies before applying a round, and the
  dispute rule that strikes a lying reducer.

The outer step itself (``OuterLoop``), the schedule (``due``) and the robust mean stay in
``swarm.diloco``, where the inner optimizer's side of Streaming DiLoCo lives.
"""

from swarm.exchange.balanced import HANDLER as BALANCED_HANDLER
from swarm.exchange.balanced import BalancedExchange
from swarm.exchange.config import EXCHANGE_STREAM_LIMITS, ExchangeConfig
from swarm.exchange.groups import RoundKey, RoundResult, plan_groups, plan_slices
from swarm.exchange.star import HANDLER, FragmentExchange
from swarm.exchange.transport import chunk

__all__ = ["BALANCED_HANDLER", "EXCHANGE_STREAM_LIMITS", "HANDLER", "BalancedExchange", "ExchangeConfig", "FragmentExchange", "RoundKey",
           "RoundResult", "chunk", "plan_groups", "plan_slices"]
