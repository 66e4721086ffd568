"""What crosses the wire between peers, and how it is encoded. Imports neither ``node`` nor ``swarm``.

- ``protocol.subspace``  boundary codec of subspace models: seed-derived basis U and frozen token
  table T_fixed; ``encode``/``decode`` of residual streams to k coefficients per token and the matching
  gradient maps ``encode_grad``/``decode_grad``; ``basis_fingerprint`` for peers to compare.

Message schemas, framing, validation and the tensor codecs (16-bit, int8, E3M0 4-bit) land with the
wire-protocol issue.
"""
