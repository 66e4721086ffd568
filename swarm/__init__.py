"""How peers find and agree with each other (imports ``protocol`` and hivemind, never ``node``).

- ``swarm.records``         DHT keys and subkeys, the signed/validated record scheme, and
  ``SwarmRecordValidator`` (runs inside every node's DHT; counts what it refuses).
- ``swarm.dht``             ``SwarmDHT``: hivemind's DHT started in the background with bootstrap
  retries and states, publishing and reading stage/run records.
- ``swarm.claiming``        which stage to claim and when to move (pure functions over records).
- ``swarm.state_transfer``  ``StageStateServer`` / ``download_stage_state``: a stage's weights over
  hivemind P2P, chunked and SHA-256 verified.
- ``swarm.status``          ``node status``: read the swarm from any peer (client-mode DHT).
- ``swarm.simulator``       ``LocalSwarm`` / ``node sim``: real ``node start`` processes on localhost
  with a fault script; the swarm tests' fixture.

Routing and the fragment exchange land with the pipeline and Streaming DiLoCo issues.
"""
