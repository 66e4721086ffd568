"""How peers find and agree with each other (imports ``protocol``, never ``node``).

Planned modules (DESIGN §3), landing with the daemon, pipeline and Streaming DiLoCo issues: DHT
records and their validation, stage claiming and rebalancing, routing, fragment exchange, state sync
for joiners, and the localhost swarm simulator. Empty for now.
"""
