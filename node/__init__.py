"""The daemon a volunteer runs, and everything local to one peer. Imports ``swarm`` and ``protocol``.

- ``node.daemon``       ``NodeDaemon``: ``node start``'s lifecycle only (metrics first, background bootstrap,
                        run parameters, the stage (``node.placement``), OFFLINE + checkpoint on exit)
- ``node.daemon_view``  what a running node shows: its /health document and its status line's snapshot
- ``node.services``     ``NodeServices``: the P2P loop and the handlers that live as long as the node
- ``node.context``      ``NodeContext``: what a stage host needs of the node around it
- ``node.stage_host``   ``StageHost``: everything for the one stage served, built and torn down as a unit;
                        ``ReplicaTrainer``: local training of the whole model (one stage)
- ``node.stage_store``  ``StageStore``: a stage's persistence (checkpoints, snapshots for peers, loading them)
- ``node.stage_download`` ``StageDownloader``: a stage's state from its other replicas (retried with back-off;
                        ``StageUnavailable`` when peers serve it but it cannot be had)
- ``node.claim``        which stage fits this node's device and which it should take
- ``node.placement``    ``StagePlacement``: the node's side of claiming: the claim, hosting a stage (another
                        one when the claimed one cannot be downloaded), the rebalancing moves
- ``node.presence``     ``SwarmPresence``: the node's stage and run records in the DHT, and the swarm view
                        it reads back (metrics, router, replica schedule)
- ``node.reachability`` ``ReachabilityProbe``: whether peers can dial this node (dial-back by peers), and
                        what it may serve then (``stages_for``)
- ``node.run_params``   what a run publishes and what a joiner keeps local (``config_from_run``)
- ``node.engine``       ``StageEngine``: one stage's tensors on its device and its inner training step, the
                        only stage engine
- ``node.chain``        ``StageChain``: every stage in one process, boundaries as a swarm's (optionally
                        rounded through the wire codecs)
- ``node.model_config`` ``ModelConfig`` (``[model]``), re-exported by ``node.config``
- ``node.pipeline``     ``PipelineCompute`` (a stage engine on its worker thread) and ``PipelineRole``
                        (serving and driving a pipeline stage)
- ``node.replica_sync`` ``ReplicaSync``: Streaming DiLoCo between the replicas of the served stage
- ``node.memory``       per-stage memory estimate (the memory half of ``node plan``)
- ``node.throughput``   tokens/s, GPU utilisation and DiLoCo rounds a card and link allow (its speed half)
- ``node.plan_cli``     the ``node plan`` command
- ``node.model_files``  the model as files: ``node export``'s formats (native; hf: the merged dense Llama),
                        written whole or not at all, and read back (``load_export``)
- ``node.export_swarm`` ``SwarmExport``: every stage's agreed weights fetched from its replicas (``node export``)
- ``node.model_use``    an exported model's validation loss and samples (``node eval``, ``node generate``)
- ``node.model_cli``    the ``node export``, ``node eval`` and ``node generate`` commands
- ``node.status_line``  ``node start``'s live status line
- ``node.identity``     the identity key's lock (one running daemon per identity)
- ``node.last_run``     ``RunMemory``: the run an identity was last in and its peers (restarting is resuming:
                        ``plan_start``), and the check that the listen port is free
- ``node.metrics``      ``NodeMetrics`` (Prometheus registry) and ``MetricsServer`` (/metrics, /health)
- ``node.metric_families`` ``NodeMetricFamilies``: every Prometheus family of a node (names, help texts,
                        labels, buckets), grouped by what it watches
- ``node.config``       typed run config (``RunConfig``: one section per component; the swarm and
                        protocol components' sections are defined next to them) loaded from TOML presets
                        in ``configs/`` with ``section.field=value`` overrides
- ``node.config_toml``  the TOML side of the config: finding presets, ``extends`` layering, overrides,
                        checking values against field types
- ``node.model``        Llama-style decoder split into ``Stage`` modules; subspace constraint (W = U·Z);
                        the parameter-balanced stage split
- ``node.data``         embedded stdlib corpus, text / uint16-shard loaders, ``BatchSampler``
- ``node.tokenizer``    the byte tokenizer and a local ``tokenizer.json`` one, ``token_dtype``
- ``node.checkpoint``   atomic (write-then-rename) checkpoints in one format, and resume
- ``node.train_local``  one-process training (``node train-local``) on a ``StageChain``
- ``node.device``       device choice (``auto``), autocast, device memory figures
- ``node.cli``          the ``node`` / ``protoswarm`` command (start, status, sim, plan, train-local, config)
"""

import swarm  # noqa: F401  (sets hivemind's memory-sharing strategy before hivemind is imported)
