"""Round-trip time of one pipeline-sized frame over hivemind P2P: asyncio's event loop against uvloop.

Two hivemind P2P daemons in one process (each with its own go-libp2p daemon, as two nodes have); the
second opens a stream to the first's handler, writes one protoswarm frame (protocol/framing.py) and reads
the reply of the same size, which is what one pipeline hop does: for a frame the size of the tiny
preset's activation frame (8 × 129 tokens × 8 bf16 coefficients ≈ 17 KB) and a dense one (× 32). Each
loop runs in a fresh subprocess, ``--repeats`` times, interleaved; a run's figure is the median (and
p90) over ``--rounds`` round trips after a warm-up; the summary gives each figure's median, min and max over a loop's runs, and the speed-up
is the ratio of the medians.

    python bench/hop_latency.py            # both loops, 300 round trips each
    python bench/hop_latency.py --rounds 500 --repeats 3

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"subspace_frame": 8 * 129 * (8 * 2 + 1), "dense_frame": 8 * 129 * (256 * 2 + 1)}
HANDLER = "protoswarm.bench.echo"


async def measure(rounds: int) -> dict[str, float]:
    from hivemind.p2p import P2P

    from protocol.framing import read_frame, write_frame
    from protocol.tensors import WireLimits

    limits = WireLimits()
    server = await P2P.create()
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())

    async def echo(info, reader, writer) -> None:
        try:
            while (frame := await read_frame(reader, limits, timeout=30)) is not None:
                await write_frame(writer, frame, timeout=30)
        finally:
            writer.close()

    await server.add_binary_stream_handler(HANDLER, echo)
    out = {}
    try:
        for name, size in SIZES.items():
            payload = bytes(size)
            times = []
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER)
            for i in range(rounds + 20):  # the first 20 warm up
                start = time.perf_counter()
                await write_frame(writer, payload, timeout=30)
                await read_frame(reader, limits, timeout=30)
                if i >= 20:
                    times.append(time.perf_counter() - start)
            writer.close()
            out[f"{name}_bytes"] = size
            out[f"{name}_median_ms"] = round(1000 * statistics.median(times), 3)
            out[f"{name}_p90_ms"] = round(1000 * statistics.quantiles(times, n=10)[-1], 3)
    finally:
        await client.shutdown()
        await server.shutdown()
    return out


def child(loop: str, rounds: int) -> None:
    if loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    print(json.dumps({"loop": loop, **runner(measure(rounds))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop, interleaved")
    parser.add_argument("--child", choices=("asyncio", "uvloop"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    rows = {}
    for loop in ("asyncio", "uvloop") * args.repeats:  # interleaved: drift shows as disagreement
        out = subprocess.run([sys.executable, __file__, "--child", loop, "--rounds", str(args.rounds)],
                             capture_output=True, text=True, timeout=600, cwd=REPO)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.setdefault(loop, []).append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    keys = [k for k in rows["asyncio"][0] if k.endswith("_ms")]
    summary = {loop: {k: {"median": round(statistics.median(r[k] for r in runs), 3),
                          "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}
               for loop, runs in rows.items()}

    def speedup(frame: str) -> float:
        key = f"{frame}_median_ms"
        return round(summary["asyncio"][key]["median"] / summary["uvloop"][key]["median"], 3)

    print(json.dumps({
        "bench": "hop_latency", "rounds": args.rounds, "repeats": args.repeats, "runs": rows,
        "across_runs": summary,  # each figure's median, min and max over the runs of one loop
        "uvloop_speedup_subspace": speedup("subspace_frame"), "uvloop_speedup_dense": speedup("dense_frame"),
        "command": " ".join(["python bench/hop_latency.py", *sys.argv[1:]]),
    }))


if __name__ == "__main__":
    main()
