"""Prometheus file-based service discovery for a local swarm: the live nodes' /metrics endpoints in a
file that `node sim --prometheus-sd FILE` keeps (docs/metrics.md); a part of ``LocalSwarm``."""

from __future__ import annotations

import json
import os
from typing import Any


class PrometheusTargets:
    """Mixed into ``LocalSwarm``: needs its ``nodes``, ``run_id``, ``prometheus_sd``, ``_sd_written`` and
    ``_metrics_port``."""

    @property
    def prometheus_targets(self) -> list[dict[str, Any]]:
        """The target groups last written to ``prometheus_sd`` (empty before the first write)."""
        return list(self._sd_written or [])

    def write_prometheus_targets(self) -> bool:
        """Write the live nodes' metrics endpoints to ``prometheus_sd`` (Prometheus ``file_sd_configs``
        format) when they changed; atomically, so Prometheus never reads half a file. True if written."""
        if self.prometheus_sd is None:
            return False
        groups = [{"targets": [f"{node.host}:{node.metrics_port}"],
                   "labels": {"swarm": self.run_id, "node": str(node.index)}}
                  for node in self.nodes if node.alive and self._metrics_port(node) is not None]
        if groups == self._sd_written:
            return False
        self.prometheus_sd.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.prometheus_sd.with_name(self.prometheus_sd.name + ".tmp")
        tmp.write_text(json.dumps(groups, indent=1) + "\n")
        os.replace(tmp, self.prometheus_sd)
        self._sd_written = groups
        return True
