"""The daemon a volunteer runs, and everything local to one peer. Imports ``swarm`` and ``protocol``.

- ``node.daemon``       ``NodeDaemon``: ``node start``'s lifecycle (metrics first, background bootstrap,
                        run parameters, stage claiming and rebalancing, OFFLINE + checkpoint on exit)
- ``node.run_params``   what a run publishes and what a joiner keeps local (``config_from_run``)
- ``node.serving``      ``StageWork``: the served stage's parameters, checkpoint, and local training
- ``node.identity``     the identity key's lock (one running daemon per identity)
- ``node.metrics``      ``NodeMetrics`` (Prometheus registry) and ``MetricsServer`` (/metrics, /health)
- ``node.config``       typed run config (``RunConfig`` = model / pipeline / data / train / wire / swarm
                        tables) loaded from TOML presets in ``configs/`` with ``section.field=value`` overrides
- ``node.model``        Llama-style decoder split into ``Stage`` modules; subspace constraint (W = U·Z)
- ``node.stages``       ``StageRunner``: forward/backward of one stage on boundary tensors; ``run_staged``
- ``node.data``         embedded stdlib corpus, text / uint16-shard loaders, tokenizers, ``BatchSampler``
- ``node.checkpoint``   atomic (write-then-rename) checkpoints and resume
- ``node.train_local``  one-process training loop (``node train-local``)
- ``node.device``       device selection and autocast
- ``node.cli``          the ``node`` / ``protoswarm`` command (start, status, sim, train-local, config)
"""
