"""What crosses the wire between peers, and how it is encoded. Imports neither ``node`` nor ``swarm``.

- ``protocol.messages``   every wire record (activation/gradient frames, fragment exchange, state
  sync manifest and chunks, ``StageRecord`` announcements, ``ErrorReply``), ``encode_message`` /
  ``decode_message``, ``PROTOCOL_VERSION``.
- ``protocol.schema``     the machinery under messages: body layout (u32 header length, msgpack
  header, raw payloads), typed field validation, the major-version check.
- ``protocol.framing``    frames on a byte stream: 12-byte prefix (magic, format, length, CRC-32),
  the size cap checked before reading, ``read_frame``/``write_frame``/``FrameDecoder``; ``FrameHook``
  and ``set_frame_hook``, what the simulator's emulated link (``swarm.sim.link``) plugs in as.
- ``protocol.streams``    messages on asyncio streams (hivemind P2P binary streams): ``request`` and
  ``serve_stream``, which answers bad input with an ``ErrorReply`` instead of failing; the bounded
  per-peer tables ``PeerStrikes`` (offences, bans) and ``RateLimiter`` (token buckets).
- ``protocol.admission``  ``Admission``: a peer's stream or request refused (banned, flood,
  rate_limited) before a byte of it is read; ``StreamLimits``; ``REFUSED`` counts per handler and code.
- ``protocol.tensors``    tensors on the wire: descriptors, ``WireLimits`` caps, ``encode_tensor`` /
  ``decode_tensor``, integer wire types for token ids; ``WireConfig``, the ``[wire]`` config section.
- ``protocol.settings``   what every layer's config sections are built from: ``ConfigError`` and the
  documented-field helpers ``setting`` / ``setting_list`` / ``check_positive``.
- ``protocol.codecs``     float tensor codecs by name: fp32, bf16, fp16, int8 (blockwise absmax),
  e3m0 (4-bit float), ``get_codec``; ``MeanAccumulator`` for FP32 averaging.
- ``protocol.codec_base`` the ``Codec`` interface and the registry (``CODECS``, ``register_codec``)
  that the built-in and the hivemind codecs both add themselves to.
- ``protocol.hivemind_compat``  hivemind's Float16/Uniform8Bit codecs behind the same interface, and
  why protoswarm's codecs cannot be offered to hivemind's averager.
- ``protocol.errors``     ``ProtocolError`` and its subclasses, each with a stable ``code``.
- ``protocol.subspace``   boundary codec of subspace models: seed-derived basis U and frozen token
  table T_fixed; ``encode``/``decode`` of residual streams to k coefficients per token and the matching
  gradient maps ``encode_grad``/``decode_grad``; ``basis_fingerprint`` for peers to compare.
"""
