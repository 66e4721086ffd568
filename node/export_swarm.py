"""`node export`: the swarm's model, fetched from the peers that serve it and written as files.

From any machine that reaches one peer, the exporter joins the DHT as a client (it stores nothing and
serves nothing), reads the run's published parameters and every stage's records, and downloads every
stage at once (each from its own replicas) with the chunked, SHA-256-verified state transfer
(swarm/state_transfer.py):

- With replica sync (``diloco.enabled``), a stage's *agreed* weights: the consensus state (the global
  copies every replica applied the same means to), fetched from several replicas at once. Which
  replicas count is decided by the drift rule the replicas apply to themselves (docs/diloco.md):
  among replicas that applied the same last round of a fragment, the hash chain most of them hold is
  the stage's; a replica off it has drifted and is no donor; a tie (no majority) is refused. Of the
  agreeing replicas, the history most of them share is taken (ties: the most rounds applied).
- Without it, the weights of the most advanced replica (there is no agreed state to take).

A stage with no ONLINE server is refused with the stages' state; so is one whose download fails.
Progress (bytes, rate, ETA) is logged while downloading. The stages are assembled into one
:class:`node.model.LanguageModel` and written by :func:`node.model_files.write_export`, with where each
stage came from (peers, rounds, digest) in ``protoswarm.json``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from node.config import RunConfig, build_config
from node.model import LanguageModel
from node.model_files import ExportError, write_export
from node.run_params import config_from_run
from node.stage_store import StageStore
from protocol.messages import StageRecord
from swarm.access import GatedP2P, SwarmAccess
from swarm.dht import SwarmDHT
from swarm.state_transfer import StateTransferError, download_from_replicas, download_stage_state
from swarm.status import StatusError, pick_run
from swarm.transfer_pace import MBIT, TransferPace

logger = logging.getLogger(__name__)


def _round(entry: str) -> int:
    tag = entry.split(":", 1)[0]
    return int(tag) if tag.lstrip("-").isdigit() else -1


def agreed_replicas(stage: int, records: list[StageRecord], fragments: int) -> tuple[list[StageRecord], list[str]]:
    """The replicas of ``stage`` to take its consensus state from, and the history they share (see the
    module docstring); ExportError when the replicas disagree with no majority or publish no history."""
    usable = [r for r in records if len(r.outer_history) == fragments]
    if not usable:
        raise ExportError(f"stage {stage}: none of its {len(records)} server(s) publishes an outer history of "
                          f"{fragments} fragment(s) (another protoswarm version?)")
    majority: list[dict[int, str]] = []
    for p in range(fragments):
        by_round: dict[int, collections.Counter[str]] = {}
        for r in usable:
            by_round.setdefault(_round(r.outer_history[p]), collections.Counter())[r.outer_history[p]] += 1
        chosen = {}
        for tag, chains in by_round.items():
            top = chains.most_common(2)
            if len(top) == 2 and top[0][1] == top[1][1]:
                raise ExportError(
                    f"stage {stage} fragment {p}: the replicas that applied round {tag} disagree with no majority "
                    f"({top[0][1]} hold {top[0][0]}, {top[1][1]} hold {top[1][0]}): their weights drifted apart; "
                    "wait for them to resync (they download the stage's state when they see it) and export again")
            chosen[tag] = top[0][0]
        majority.append(chosen)
    agreed = [r for r in usable if all(majority[p][_round(h)] == h for p, h in enumerate(r.outer_history))]
    groups = collections.Counter(tuple(r.outer_history) for r in agreed)
    best = max(groups, key=lambda h: (groups[h], sum(_round(x) for x in h)))
    return [r for r in agreed if tuple(r.outer_history) == best], list(best)


def _servers(records: dict[int, list[StageRecord]], stage: int) -> list[StageRecord]:
    online = [r for r in records.get(stage, []) if r.state == "online"]
    # Peers behind NAT cannot be dialled: donors only when nobody else serves the stage.
    return [r for r in online if r.reachable != "private"] or online


class SwarmExport:
    """One export: the swarm's run read, each stage downloaded, the model written (see the module docstring)."""

    def __init__(self, join: list[str], run_id: str | None, access: SwarmAccess | None = None,
                 timeout: float = 60.0, stall_s: float = 60.0) -> None:
        self.join, self.run_id, self.access = join, run_id, access or SwarmAccess(None)
        self.timeout, self.stall_s = timeout, stall_s
        self.provenance: list[dict[str, Any]] = []

    def run(self, out: str | Path, fmt: str, tokenizer_file: str | Path | None = None) -> dict[str, Any]:
        """Export to ``out``; returns a summary (what ``node export --json`` prints)."""
        started = time.monotonic()
        dht = SwarmDHT(initial_peers=self.join, host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True,
                       retry_max_s=2.0, access=self.access)
        dht.run_in_background()
        try:
            if not dht.wait_online(self.timeout):
                raise ExportError(f"cannot reach the swarm at {', '.join(self.join)} within {self.timeout:.0f} s "
                                  f"({dht.last_error})")
            try:
                records, owners, _ = dht.get_run_records()
                run, params, num_stages = pick_run(records, owners, self.run_id)
                by_stage, _ = dht.get_stage_records(run.run_id, num_stages)
            except StatusError as exc:
                raise ExportError(str(exc)) from None
            except TimeoutError:
                raise ExportError(f"the swarm did not answer within {dht.call_timeout:.0f} s") from None
            cfg = config_from_run(params, build_config({}))
            missing = [s for s in range(num_stages) if not _servers(by_stage, s)]
            if missing:
                served = {s: len(_servers(by_stage, s)) for s in range(num_stages)}
                raise ExportError(f"run {run.run_id}: stage(s) {missing} have no ONLINE server (servers per stage: "
                                  f"{served}); the model cannot be assembled until every stage is served")
            with tempfile.TemporaryDirectory(prefix="protoswarm-export-") as scratch:
                stages = asyncio.run(self._download_all(dht, cfg, run.run_id, by_stage, Path(scratch)))
        finally:
            dht.shutdown(graceful=False)
        model = LanguageModel(cfg.model, stages=[store.module for store in stages])
        provenance = {"run_id": run.run_id, "exported_at": time.time(), "stages": self.provenance}
        path = write_export(out, model.eval(), cfg, fmt, provenance, tokenizer_file)
        return {"out": str(path), "format": fmt, "run_id": run.run_id, "stages": self.provenance,
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": round(time.monotonic() - started, 1)}

    async def _download_all(self, dht: SwarmDHT, cfg: RunConfig, run_id: str,
                            by_stage: dict[int, list[StageRecord]], scratch: Path) -> list[StageStore]:
        """Every stage at once: each comes from its own replicas, so over home links the export takes about
        as long as its largest stage, not their sum. The first stage that fails cancels the others."""
        p2p = GatedP2P(await dht.dht.replicate_p2p(), self.access)  # the hivemind DHT's own libp2p daemon
        tasks = [asyncio.create_task(self._download(p2p, cfg, run_id, s, _servers(by_stage, s), scratch))
                 for s in range(cfg.pipeline.num_stages)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            return [t.result() for t in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.provenance.sort(key=lambda entry: entry["stage"])
            await p2p.shutdown()

    async def _download(self, p2p, cfg: RunConfig, run_id: str, stage: int, servers: list[StageRecord],
                        scratch: Path) -> StageStore:
        from hivemind.p2p import PeerID

        store = StageStore.fresh(cfg, run_id, stage, scratch / f"stage{stage}")
        pace = TransferPace(stall_s=self.stall_s, floor_bytes_s=cfg.swarm.download_floor_mbit * MBIT, report_every_s=2.0)
        limits = cfg.wire.limits()
        started = time.monotonic()
        try:
            if cfg.diloco.enabled:
                donors, history = agreed_replicas(stage, servers, cfg.diloco.fragments)
                logger.info("stage %d: taking the consensus of %d of %d replica(s) (history %s)", stage, len(donors),
                            len(servers), history)
                snap, served = await download_from_replicas(
                    p2p, [PeerID.from_base58(r.peer_id) for r in donors[:8]], run_id, stage, limits, timeout=None,
                    pace=pace)
                store.load_consensus(snap)
                what = {"agreement": "consensus", "history": store.outer.history(),
                        "agreed_tag": store.outer.agreed_tag(), "replicas": len(servers), "donors": sorted(served)}
            else:
                donor = max(servers, key=lambda r: r.progress)
                logger.info("stage %d: replica sync is off; taking the weights of its most advanced replica %s "
                            "(progress %d)", stage, donor.peer_id, donor.progress)
                snap = await download_stage_state(p2p, PeerID.from_base58(donor.peer_id), run_id, stage, limits,
                                                  timeout=None, pace=pace)
                store.check_compatible(snap)
                store.load(snap)
                what = {"agreement": "none (replica sync off): the most advanced replica", "replicas": len(servers),
                        "donors": [donor.peer_id], "progress": snap.step}
        except (StateTransferError, ValueError) as exc:
            raise ExportError(f"stage {stage}: cannot download its state from {len(servers)} server(s): {exc}") from None
        self.provenance.append({"stage": stage, **what, "seconds": round(time.monotonic() - started, 2)})
        logger.info("stage %d of %d downloaded in %.1f s", stage + 1, cfg.pipeline.num_stages, time.monotonic() - started)
        return store
