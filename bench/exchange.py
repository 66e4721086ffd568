"""Star against balanced fragment exchange: round time and bytes per member on shaped home links (issue 20).

For each group size G, G member processes, each in its own network namespace with a ``tc tbf``-shaped
link (swarm/sim/netns.py, the lab's links: 80 Mbit/s each way by default), start real hivemind P2P
daemons and run both exchanges on the same parts, one round after another behind a file barrier:

- ``star``      swarm/exchange/star.py: every member sends its whole part to the round's leader, which sends
                the mean back to each (the exchange the node uses today)
- ``balanced``  swarm/exchange/balanced.py: one slice per member, each sent to its reducer and its
                checker; means come back from the reducers

Per exchange and G: ``round_s`` (median over rounds of the slowest member's round, i.e. until every
member holds the mean), ``bytes_per_member`` (mean over members of application bytes sent + received
in a round, served streams included) and ``max_over_mean_bytes`` (in the worst round, the busiest member's
bytes over that round's mean). Link bytes from the kernel (headers included) are reported beside them. Needs root (namespaces).

    python bench/exchange.py --quick        # G = 2, 4, 8, 16; 2 rounds each; a 4M-value fragment (2 MB e3m0)
    python bench/exchange.py --groups 16 --rounds 5 --link 20mbit

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("star", "balanced")
RUN = "bench-exchange"


# --------------------------------------------------------------------------------------------- member


async def member(index: int, size: int, workdir: Path, address: str, numel: int, rounds: int) -> None:
    """One member process (inside its namespace): P2P up, both exchanges registered, rounds behind barriers."""
    import torch
    from hivemind.p2p import P2P

    from swarm.exchange import BalancedExchange, ExchangeConfig, FragmentExchange, RoundKey

    torch.set_num_threads(1)
    first = workdir / "maddr-0"
    initial = [] if index == 0 else [await _read_when_there(first)]
    p2p = await P2P.create(host_maddrs=[f"/ip4/{address}/tcp/0"], initial_peers=initial)
    maddrs = [str(m) for m in await p2p.get_visible_maddrs() if address in str(m)]
    if index == 0:
        _write(first, maddrs[0])
    me = p2p.peer_id.to_base58()
    _write(workdir / f"peer-{index}", me)
    peers = [await _read_when_there(workdir / f"peer-{i}") for i in range(size)]
    config = ExchangeConfig(gather_s=60.0, timeout_s=120.0, max_group=size)
    exchanges = {"star": FragmentExchange(p2p, me, RUN, 0, [numel], config, "e3m0"),
                 "balanced": BalancedExchange(p2p, me, RUN, 0, [numel], config, "e3m0")}
    for ex in exchanges.values():
        ex.set_peers(peers)
        await ex.register()
    part = torch.randn(numel, generator=torch.Generator().manual_seed(index)) * 1e-3
    results = []
    await _barrier(workdir, "ready", index, size)
    for kind in KINDS:
        ex = exchanges[kind]
        for r in range(rounds):
            before = ex.stats["bytes_sent"] + ex.stats["bytes_received"]  # before anyone may send to us
            await _barrier(workdir, f"{kind}-{r}", index, size)
            t0 = time.monotonic()
            result = await ex.run_round(RoundKey(0, 0, r), part)
            seconds = time.monotonic() - t0
            await _barrier(workdir, f"{kind}-{r}-done", index, size)
            # A serving handler counts its bytes after its last write returns, which may be just after the
            # member read them: wait until the counters stop moving.
            total = await _settled(lambda ex=ex: ex.stats["bytes_sent"] + ex.stats["bytes_received"])
            results.append({"kind": kind, "round": r, "seconds": seconds, "committed": result.mean is not None,
                            "reason": result.reason, "bytes": total - before})
    _write(workdir / f"result-{index}", json.dumps(results))
    await _barrier(workdir, "end", index, size)
    await p2p.shutdown()


async def _settled(read, quiet_s: float = 0.3, limit_s: float = 10.0) -> int:
    """``read()`` once it has not changed for ``quiet_s`` (at most ``limit_s``)."""
    value, since, start = read(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        await asyncio.sleep(0.05)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _read_when_there(path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return path.read_text()


async def _barrier(workdir: Path, name: str, index: int, size: int, timeout: float = 300.0) -> None:
    (workdir / f"b-{name}-{index}").touch()
    deadline = time.monotonic() + timeout
    while sum((workdir / f"b-{name}-{i}").exists() for i in range(size)) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name} not reached by every member within {timeout:.0f} s")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------- parent


def run_group(size: int, link: str, numel: int, rounds: int) -> dict:
    from swarm.sim.link import LinkSpec
    from swarm.sim.netns import NetnsLab

    spec = LinkSpec.parse(link)
    with NetnsLab() as lab, tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        workdir = Path(tmp)
        procs = []
        try:
            for i in range(size):
                host = lab.add(i, spec)
                cmd = [*lab.exec_prefix(i), sys.executable, __file__, "--member", str(i), "--size", str(size),
                       "--workdir", tmp, "--address", host.address, "--numel", str(numel), "--rounds", str(rounds)]
                log = open(workdir / f"log-{i}", "wb")
                procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
            link_before = [lab.link_bytes(i) for i in range(size)]
            deadline = time.monotonic() + 120 + 60 * rounds * len(KINDS) * max(1, size // 4)
            for proc, _ in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            link_after = [lab.link_bytes(i) for i in range(size)]
        finally:
            for proc, log in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        bad = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
        if bad:
            tail = (workdir / f"log-{bad[0]}").read_text()[-2000:]
            raise RuntimeError(f"member(s) {bad} of G={size} failed; member {bad[0]}'s log ends:\n{tail}")
        rows = [json.loads((workdir / f"result-{i}").read_text()) for i in range(size)]
    out = {}
    for kind in KINDS:
        per_round = [[next(r for r in rows[i] if r["kind"] == kind and r["round"] == k) for i in range(size)]
                     for k in range(rounds)]
        member_bytes = [statistics.fmean(per_round[k][i]["bytes"] for k in range(rounds)) for i in range(size)]
        mean = statistics.fmean(member_bytes)
        # The busiest member of each round against that round's mean (the star's leader changes every round).
        ratios = [max(m["bytes"] for m in rnd) / statistics.fmean(m["bytes"] for m in rnd) for rnd in per_round]
        out[kind] = {
            "round_s": round(statistics.median(max(m["seconds"] for m in rnd) for rnd in per_round), 3),
            "round_s_each": [round(max(m["seconds"] for m in rnd), 3) for rnd in per_round],
            "committed_all": all(m["committed"] for rnd in per_round for m in rnd),
            "skips": sorted({m["reason"] for rnd in per_round for m in rnd if not m["committed"]}),
            "bytes_per_member": round(mean), "max_member_bytes": round(max(max(m["bytes"] for m in rnd) for rnd in per_round)),
            "max_over_mean_bytes": round(max(ratios), 3),
        }
    link_total = [a["sent"] + a["received"] - b["sent"] - b["received"] for a, b in zip(link_after, link_before,
                                                                                      strict=True)]
    out["link_bytes_per_member_both_kinds"] = round(statistics.fmean(link_total))
    out["link_max_over_mean_both_kinds"] = round(max(link_total) / statistics.fmean(link_total), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="G = 2 4 8 16, 2 rounds each")
    parser.add_argument("--groups", type=int, nargs="+", help="group sizes (default 2 4 8 16)")
    parser.add_argument("--rounds", type=int, help="rounds per exchange and G (default 2 quick / 5)")
    parser.add_argument("--link", default="80mbit", help="each member's link, both ways (default 80mbit)")
    parser.add_argument("--numel", type=int, default=1 << 22, help="values in the fragment (default 4M: 2 MB e3m0)")
    parser.add_argument("--member", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    if args.member is not None:
        asyncio.run(member(args.member, args.size, Path(args.workdir), args.address, args.numel, rounds))
        return
    from swarm.sim.netns import netns_unavailable

    reason = netns_unavailable()
    if reason:
        print(json.dumps({"bench": "exchange", "skipped": reason}))
        return
    groups = args.groups or [2, 4, 8, 16]
    t0 = time.time()
    out: dict = {"bench": "exchange", "link": args.link, "numel": args.numel, "codec": "e3m0", "rounds": rounds,
                 "star": {}, "balanced": {}, "link_bytes": {}}
    for g in groups:
        print(f"G={g} ...", file=sys.stderr, flush=True)
        res = run_group(g, args.link, args.numel, rounds)
        for kind in KINDS:
            out[kind][str(g)] = res[kind]
            print(f"  {kind:<9} round {res[kind]['round_s']:7.2f} s  {res[kind]['bytes_per_member'] / 1e6:7.2f} MB/member"
                  f"  busiest/mean {res[kind]['max_over_mean_bytes']:.2f}  all committed {res[kind]['committed_all']}",
                  file=sys.stderr, flush=True)
        out["link_bytes"][str(g)] = {k: res[k] for k in ("link_bytes_per_member_both_kinds",
                                                         "link_max_over_mean_both_kinds")}
    big = str(max(groups))
    out["balanced_max_over_mean_at_largest_g"] = out["balanced"][big]["max_over_mean_bytes"]
    out["goal_max_over_mean_le_2_5"] = out["balanced"][big]["max_over_mean_bytes"] <= 2.5
    out["seconds"] = round(time.time() - t0, 1)
    out["command"] = " ".join(["python bench/exchange.py", *sys.argv[1:]])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
