"""Costs of the wire layer that docs/protocol.md quotes (beyond the codecs themselves).

- ``crc32_GBps``: zlib CRC-32 over a 64 MiB buffer (the frame checksum);
- ``block_size``: e3m0 and int8 relative L2 error and bits/value for block sizes 32..1024 on N(0,1)
  data (why the codecs use 256-value blocks);
- ``max_frame_decode_s``: decode_message of the largest e3m0 FragmentPart that fits the default
  64 MiB frame, one thread;
- ``hostile_header``: decode_message of a 1 MiB header whose unknown key holds ~1M empty lists:
  CPU seconds and peak-RSS growth before the message is accepted or refused.

    python bench/wire.py --quick      # ~30 s on 2 CPU cores
    python bench/wire.py              # more repeats, 2^22 values for the block-size table

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import msgpack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.codecs import E3M0Codec, Int8Codec
from protocol.errors import ProtocolError
from protocol.messages import FragmentPart, decode_message, encode_message
from protocol.tensors import DEFAULT_LIMITS


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 7
    result: dict = {"bench": "wire", "quick": args.quick, "threads": 1}

    # First, while peak RSS is still low (ru_maxrss is a high-water mark).
    header = {"v": [1, 0], "kind": "state_request", "run_id": "r", "stage": 0, "payloads": [],
              "x": [[] for _ in range(1_040_000)]}
    packed = msgpack.packb(header)
    hostile = struct.pack("<I", len(packed)) + packed
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    try:
        decode_message(hostile)
        outcome = "accepted (unknown key ignored)"
    except ProtocolError as exc:
        outcome = f"refused: {exc.code}"
    result["hostile_header"] = {
        "header_MiB": round(len(packed) / 2**20, 3),
        "cpu_seconds": round(time.process_time() - start, 3),
        "peak_rss_growth_MiB": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1),
        "outcome": outcome,
    }
    print(f"hostile header: {result['hostile_header']}", file=sys.stderr)

    buf = os.urandom(64 << 20)
    result["crc32_GBps"] = round(len(buf) / best_of(repeats, lambda: zlib.crc32(buf)) / 1e9, 2)
    print(f"crc32: {result['crc32_GBps']} GB/s", file=sys.stderr)

    x = torch.randn(1 << (20 if args.quick else 22), generator=torch.Generator().manual_seed(0))
    rows = []
    for block in (32, 64, 128, 256, 1024):
        row = {"block": block}
        for cls in (E3M0Codec, Int8Codec):
            codec = cls()
            codec.block = block
            y = codec.decode(codec.encode(x), x.shape)
            row[cls.name] = {
                "bits_per_value": codec.bits_per_value(x.numel()),
                "rel_l2_error": round(float((y - x).norm() / x.norm()), 4),
            }
        rows.append(row)
        print(f"block {block}: {row}", file=sys.stderr)
    result["block_size"] = {"numel": x.numel(), "data": "N(0,1), seed 0", "rows": rows}

    # Largest e3m0 part under the default frame cap: 4.125 bits per value plus a small header.
    n = (DEFAULT_LIMITS.max_frame_bytes - 4096) * 8 * 256 // (4 * 256 + 32)
    part = FragmentPart(run_id="r", stage=0, round_id=0, fragment_id=0, part=0, num_parts=1, offset=0,
                        total_values=n, values=torch.randn(n))
    body = encode_message(part)
    del part
    seconds = best_of(repeats, lambda: decode_message(body))
    result["max_frame_decode_s"] = {
        "frame_MiB": round(len(body) / 2**20, 2), "values": n, "seconds": round(seconds, 3),
    }
    print(f"max frame: {result['max_frame_decode_s']}", file=sys.stderr)

    print(json.dumps(result))


if __name__ == "__main__":
    main()
