"""How peers find and agree with each other (imports ``protocol`` and hivemind, never ``node``).

- ``swarm.records``         DHT keys and subkeys, the signed/validated record scheme, and
  ``SwarmRecordValidator`` (runs inside every node's DHT; counts what it refuses).
- ``swarm.dht``             ``SwarmDHT``: hivemind's DHT started in the background with bootstrap
  retries and states, publishing and reading stage/run records.
- ``swarm.claiming``        which stage to claim and when to move (pure functions over records).
- ``swarm.state_transfer``  ``StageStateServer`` / ``download_stage_state``: a stage's weights over
  hivemind P2P, chunked and SHA-256 verified.
- ``swarm.state_codec``     a stage's state as bytes and its manifest (``StageSnapshot``,
  ``encode_snapshot`` / ``decode_snapshot``, ``manifest_digest``).
- ``swarm.state_fetch``     one download attempt on the client: ``check_manifest``, ``StateFetch``
  (the buffer, chunks fetched and verified one by one).
- ``swarm.chunk_cache``     ``ChunkCache``: verified chunks kept on disk, so a retried or restarted
  download fetches only what it lacks.
- ``swarm.transfer_pace``   ``TransferPace`` / ``TransferProgress``: a download's stall window and
  deadline sized from the state and the measured rate; its bytes, rate and ETA.
- ``swarm.status``          ``node status``: read the swarm from any peer (client-mode DHT).
- ``swarm.routing``         ``Router``: which replica of the next stage gets a microbatch (earliest
  expected finish, bans with backoff).
- ``swarm.dataplane``       ``DataPlane``: microbatches between stage replicas over hivemind P2P,
  one role a file (serve, send, drive; its docstring maps them); ``DataplaneConfig``, the
  ``[dataplane]`` section it takes.
- ``swarm.diloco``          Streaming DiLoCo's outer loop for one replica: fragments, the schedule
  as a function of progress, the Nesterov outer step with overlap and mixing, the robust mean;
  ``DilocoConfig``, the ``[diloco]`` section it takes (error feedback included).
- ``swarm.first_moment``    ``FirstMoment`` (``diloco.first_moment``): a replica's AdamW first moment of a
  fragment read when its round begins and the replicas' mean merged, clipped to the replica's own Adam
  bound; ``round_with_moment``, the part's round and the moment's side by side.
- ``swarm.diloco_group``    ``InProcessGroup``: replicas agreeing in one process, the harness of the
  golden test and bench/diloco.py.
- ``swarm.exchange``        the fragment exchange, a package (its docstring maps it): a stage's replicas
  average one fragment over hivemind P2P, through a leader per group (``FragmentExchange``) or balanced
  over every member with a checker per slice (``BalancedExchange``); ``ExchangeConfig``, the
  ``[exchange]`` section.
- ``swarm.access``          swarm-key access control.
- ``swarm.reachability``    the dial-back check: ``DialbackServer`` (dials an asker back at the address its
  stream came from), ``ask_dialback``, ``verdict`` (public / private / not known).
- ``swarm.procs``           what a node's child processes leave behind: ``descendants``, libp2p socket
  files (``p2pd_sockets``, ``remove_unbound_sockets``).
- ``swarm.sim``             the localhost simulator, a package (its docstring maps it): ``LocalSwarm`` /
  ``node sim``, real ``node start`` processes with a fault script, the swarm tests' fixture; the
  network-namespace home links; ``LinkSpec`` and the in-process ``LinkEmulator`` (``swarm.link``).

Each component takes its config section itself (built on ``protocol.settings``); node/config.py
only composes the sections into a run config.
"""

import os

# hivemind backs every DHT call's future with a byte of torch shared memory; under torch's default
# "file_system" strategy (hivemind's default) that starts a torch_shm_manager process per node (~64 MiB
# PSS: bench/footprint.py). Passing file descriptors instead needs no such process. Set before anything
# imports hivemind (node/__init__.py imports this package first); an explicit setting wins.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
