"""The daemon a volunteer runs, and everything local to one peer. Imports ``swarm`` and ``protocol``.

- ``node.config``       typed run config (``RunConfig`` = model / pipeline / data / train tables) loaded
                        from TOML presets in ``configs/`` with ``section.field=value`` overrides
- ``node.model``        Llama-style decoder split into ``Stage`` modules; subspace constraint (W = U·Z)
- ``node.stages``       ``StageRunner``: forward/backward of one stage on boundary tensors; ``run_staged``
- ``node.data``         embedded stdlib corpus, text / uint16-shard loaders, tokenizers, ``BatchSampler``
- ``node.checkpoint``   atomic (write-then-rename) checkpoints and resume
- ``node.train_local``  one-process training loop (``node train-local``)
- ``node.device``       device selection and autocast
- ``node.cli``          the ``node`` / ``protoswarm`` command
"""
