"""``[exchange]``: :class:`ExchangeConfig`, the settings both exchanges take (groups, deadlines, outliers,
bans, which exchange); which of its fields are the run's and which each node's own."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.admission import StreamLimits
from protocol.settings import ConfigError, check_positive, setting

# Exchange streams one peer may open on this node (protocol/admission.py): a member opens one stream a
# round to each leader, reducer or checker it sends to, a few a fragment round; floods are refused unread.
EXCHANGE_STREAM_LIMITS = StreamLimits(max_streams=32, rate=32.0, burst=128.0)


@dataclass(kw_only=True)
class ExchangeConfig:
    """The fragment exchange between a stage's replicas: groups, deadlines, outliers, bans.

    ``mode``, ``max_group``, ``max_norm_ratio`` and ``max_values_per_part`` are run-level (every replica must
    plan the same groups and chunk parts the same way); the deadlines and bans are node-local."""

    SECTION = "exchange"
    # Node-local fields (the rest are the run's, published with it: node/run_params.py).
    LOCAL_FIELDS = ("gather_s", "timeout_s", "max_early_rounds", "peer_strikes", "ban_s")

    gather_s: float = setting(
        10.0, "A group's leader waits this long (seconds) for its members' parts after reaching the round itself."
    )
    timeout_s: float = setting(
        60.0, "Longest wait for one exchange round, sending included (seconds); then it is skipped. Parts that "
        "arrive before the leader reached their round are held this long at most."
    )
    mode: str = setting(
        "balanced", "'balanced' (reduce-scatter: each member reduces one slice, another checks it; "
        "swarm/exchange/balanced.py) or 'star' (a leader averages each group's fragment: the old exchange, a baseline)."
    )
    max_group: int = setting(16, "Replicas averaged together; bigger stages form several random groups per round.")
    max_norm_ratio: float = setting(
        10.0, "A part whose norm exceeds this × the group's lower median norm is dropped from the average (>= 1)."
    )
    max_weight_ratio: float = setting(
        4.0, "A part counts in the mean by its sender's inner steps since its last part, capped at this × the "
        "group's lower median (>= 1; 1 = equal weights)."
    )
    max_values_per_part: int = setting(
        1 << 24, "Values in one FragmentPart frame; a fragment travels in ceil(values / this) parts (e3m0: 8 MiB)."
    )
    max_early_rounds: int = setting(8, "Rounds a leader holds parts for before it reached them itself.")
    peer_strikes: int = setting(4, "Malformed or dropped parts from one peer within ban_s before it is banned.")
    ban_s: float = setting(120.0, "How long a banned peer's parts are refused (seconds); also the strikes' window.")

    def __post_init__(self) -> None:
        check_positive(self, "gather_s", "timeout_s", "max_group", "max_norm_ratio", "max_values_per_part",
                       "max_early_rounds", "peer_strikes", "ban_s")
        if self.mode not in ("star", "balanced"):
            raise ConfigError(f"exchange.mode must be 'star' or 'balanced', got {self.mode!r}")
        if self.gather_s >= self.timeout_s:
            raise ConfigError(f"exchange.gather_s={self.gather_s} must be below exchange.timeout_s={self.timeout_s}")
        if self.max_weight_ratio < 1.0:
            raise ConfigError(f"exchange.max_weight_ratio must be >= 1, got {self.max_weight_ratio!r}")
        if self.max_norm_ratio < 1.0:
            raise ConfigError(f"exchange.max_norm_ratio must be >= 1, got {self.max_norm_ratio!r}")
