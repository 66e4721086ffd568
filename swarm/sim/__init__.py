"""The localhost simulator: real ``node start`` processes, home links, fault scripts (`node sim`, the tests).

Nothing here runs inside a node except ``swarm.sim.link``, for the ``swarm.link`` setting (its check, and
the in-process emulator when it is set).

- ``swarm.sim.swarm``    ``LocalSwarm``: node processes on this machine (start, kill, pause, partition,
  /health, `node status`), reaped on exit; ``SimError``; ``processes_mentioning`` (leftover check).
- ``swarm.sim.targets``  ``PrometheusTargets``: the live nodes' /metrics endpoints in a file for
  Prometheus's file-based discovery (part of ``LocalSwarm``).
- ``swarm.sim.faults``   ``parse_faults`` / ``Fault``: the fault script (``60:kill:s1,90:start:new``), and
  ``apply_fault``, which carries one out on a ``LocalSwarm``; ``Waves`` / ``WaveRunner``: kill-and-restart
  waves (``--waves 60,4,20``).
- ``swarm.sim.monitor``  ``PipelineMonitor``: losses and counters of every node incarnation from
  /health, summed into `node sim`'s summary; ``progress_line``.
- ``swarm.sim.watch``    ``SwarmWatch``: crashes, hangs, join-to-first-step, stage coverage, memory per
  node, exchange rounds and DHT record traffic, for `node sim`'s summary.
- ``swarm.sim.run``      ``run_simulation``: `node sim` (swarm, fault script, progress, summary).
- ``swarm.sim.netns``    ``NetnsLab``: one network namespace per node, tc tbf on both directions of its
  link (needs root; ``netns_unavailable`` says why not); with ``nat``, a home router namespace in front
  of a node (masquerade, no inbound port; ``nat_unavailable``).
- ``swarm.sim.iptables`` ``find_iptables`` / ``fetch_iptables``: the routers' iptables, from PATH or
  Debian's package unpacked into the cache.
- ``swarm.sim.link``     ``LinkSpec`` (a tc-style ``80mbit,delay=30ms``) and ``LinkEmulator``: the link
  emulated in-process on protoswarm's own frames, ``install``-ed as framing's frame hook; the fallback
  without root, and the delay in both cases (no netem here).

Imports ``swarm`` (``swarm.procs``) and ``protocol``; ``node`` imports it only for `node sim` and
``swarm.link``.
"""
