"""Helpers for tests that run real swarm pieces: P2P daemons in the test process, `node sim` as a subprocess."""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P


def run_p2p(n, body, timeout=90):
    """Start ``n`` connected P2P daemons, ``await body(*daemons)`` within ``timeout`` s, shut them all down."""
    async def main():
        daemons = []
        try:
            daemons.append(await P2P.create())
            for _ in range(n - 1):
                daemons.append(await P2P.create(initial_peers=await daemons[0].get_visible_maddrs()))
            async with asyncio.timeout(timeout):
                await body(*daemons)
        finally:
            for p2p in reversed(daemons):
                try:
                    await p2p.shutdown()
                except Exception:
                    pass

    asyncio.run(main())


async def wait_for(predicate, timeout, what):
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout`` s (``what`` may be a
    callable: it is called then, so the message can show the state that failed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.05)


def run_sim(nodes: int, config: str, duration: float, faults: str, workdir, timeout: float, extra=()) -> dict:
    """``node sim ... --json`` as a real subprocess; its JSON summary (asserting a clean exit)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "sim", "--nodes", str(nodes),
         "--config", config, "--duration", str(duration), "--faults", faults, "--workdir", str(workdir), "--json", *extra],
        capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
