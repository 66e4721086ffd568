"""docs/architecture.md agrees with the code: every file it names on a microbatch's hop executes during
a real hop (three stages over hivemind P2P in one process), and the hop names at most 8 files."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

from p2p_util import run_p2p, wait_for
from test_swarm_pipeline import Node, small_config, windows

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"


def hop_files() -> list[str]:
    section = DOC.read_text().split("## One microbatch's hop", 1)[1].split("\n## ", 1)[0]
    steps = [line for line in section.splitlines() if re.match(r"\d+\. ", line)]
    return sorted({f for line in steps for f in re.findall(r"\*\*((?:node|swarm|protocol)/[\w/]+\.py)\*\*", line)})


def test_the_documented_hop_is_the_path_the_code_takes(tmp_path):
    files = hop_files()
    assert 5 <= len(files) <= 8, files  # the bound on one hop's files
    seen: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_filename)

    cfg = small_config(tmp_path)

    async def body(a, b, c):
        sys.setprofile(profile)
        threading.setprofile(profile)  # the stages' compute threads start after this
        try:
            nodes = [Node(p, cfg, s, tmp_path) for p, s in ((a, 0), (b, 1), (c, 2))]
            for node in nodes:
                await node.plane.register()
            nodes[0].plane.set_next_replicas([(nodes[1].peer, 1.0)])
            nodes[1].plane.set_next_replicas([(nodes[2].peer, 1.0)])
            nodes[0].plane.start_driver(windows())
            await wait_for(lambda: nodes[0].plane.stats["microbatches_ok"] >= 2, 60, "two microbatches through")
            nodes[0].plane.stop_driver()
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        for node in nodes:
            node.compute.close()

    run_p2p(3, body)
    executed = {str(Path(f).resolve().relative_to(REPO)) for f in seen if Path(f).resolve().is_relative_to(REPO)}
    missing = [f for f in files if f not in executed]
    assert not missing, f"docs/architecture.md names {missing} on the hop, but they did not run"
