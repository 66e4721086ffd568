"""What a stage host needs of the node around it (node/stage_host.py, node/stage_download.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.config import RunConfig
from node.metrics import NodeMetrics
from node.services import NodeServices


@dataclass
class NodeContext:
    """What a stage host needs of the node around it."""

    cfg: RunConfig
    run_id: str
    peer_id: str
    device: torch.device
    metrics: NodeMetrics
    dht: Any  # swarm.dht.SwarmDHT
    services: NodeServices
    stop: threading.Event

    def checkpoint_dir(self, stage: int) -> Path:
        return Path(self.cfg.train.checkpoint_dir) / self.run_id / f"{self.peer_id}-stage{stage}"
