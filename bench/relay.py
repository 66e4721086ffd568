"""What a circuit-relay stream carries, against a direct one: hivemind P2P across the lab's home router.

Three hivemind P2P daemons (go-libp2p, as every node runs), each in its own network namespace of the
lab (swarm/sim/netns.py), every link shaped to ``--link``:

- **R**, public: the relay (``force_reachability="public"``). Every hivemind daemon with ``use_relay``
  (the default) serves circuit relay v2: p2pd's EnableRelayV2 starts go-libp2p's relay with its
  default resources on every node, whatever its reachability, besides the service that the
  ``-relayDataLimit``/``-relayTimeLimit`` flags configure, which go-libp2p starts only on a host that
  believes itself public. Both register the same protocol, and which one answers varies from run to
  run: ``relay_said`` shows either a reset after 131072 relayed bytes (go-libp2p's default limit of
  128 KiB and 2 min per relayed connection) or the whole stream (p2pd's 4 GiB and 30 min);
- **T**, behind a home router (``nat=True``: masquerade, no inbound port), with ``use_auto_relay``,
  R as its trusted relay and ``force_reachability="private"`` (autorelay only runs on a host that
  believes itself private), so it reserves a slot on R and is reachable at
  ``/…/p2p/R/p2p-circuit/p2p/T``;
- **C**, public.

Measured, each as bytes delivered (counted by the receiver's handler, so a reset stream still says
how far it got), seconds, MB/s, and how the stream ended:

- ``reservation``: seconds from T's daemon start until autorelay holds a reservation (go-libp2p's
  ``autorelay`` debug line "adding new relay"), and whether T's own addresses then list a circuit one
  (they do not here: autorelay drops a relay's private addresses, and the lab's are 10.x, so the bench
  builds the circuit address from R's own);
- ``relayed``: C drops any direct connection to T (T's autorelay reserves on C too, since every
  hivemind daemon serves as a relay, and so dials C), connects to T over the circuit address and
  streams ``--bytes`` to T's handler (what anyone dialling a NATed node has to do); ``relay_said``
  quotes R's account of the relayed bytes and of the reset, if any;
- ``after``: the same again ``--settle`` seconds later (dialling the circuit again if the first
  connection is gone), in case libp2p's hole punching (DCUtR) replaced the relayed connection with a
  direct one by then; the connection's address says which it used, and ``hole_punch.started_on``
  whether DCUtR ran at all (it waits until a host sees a public address of its own);
- ``direct``: T drops its connection to C, dials C's own address and streams ``--bytes`` to C (the
  NATed node dials out itself: what a stage-0 driver or an exchange member does). Measured last,
  because a direct connection between C and T would carry the relayed measurement's stream too.

``log`` lists, per daemon, the distinct debug lines of go-libp2p's relay, autorelay, hole-punch and
AutoNAT loggers (first time, count): the evidence for the reservation and hole-punch findings.

    python bench/relay.py                      # 80 Mbit/s links, 16 MiB per stream
    python bench/relay.py --link 80mbit --bytes 16777216
    python bench/relay.py --link 20mbit --bytes 4194304

Needs root (namespaces) and iptables (unpacked from Debian's package when missing). Takes about
four minutes: with a single candidate relay, autorelay waits out its 3-minute boot delay before it
reserves (it wants 4 candidates; p2pd's static-relay mode, which skips that, needs -relayDiscovery=0,
and hivemind's P2P.create does not pass it). Prints human lines on stderr and one JSON object as the
last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SINK = "protoswarm.bench.sink"
BLOCK = 1 << 16
# go-log subsystems whose debug lines tell what the relay machinery did; everything else stays at error
WATCHED = ("autorelay", "relay", "p2p-circuit", "p2p-holepunch", "autonat", "relaysvc")
GOLOG_LEVEL = ",".join(["error", *(f"{name}=debug" for name in WATCHED)])

_started = time.monotonic()
_events: dict[tuple[str, str], dict] = {}  # (logger, msg) -> {"t": first seen, "n": count, "fields": …}
_sunk: list[dict] = []  # one record per stream the sink handled


def _since_start() -> float:
    return round(time.monotonic() - _started, 2)


def _capture_p2pd_line(line: str) -> bool:
    """Keep a watched go-log line as an event; True if it was one (then hivemind need not log it)."""
    if '"logger"' not in line:
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if record.get("logger") not in WATCHED:
        return False
    key = (record["logger"], str(record.get("msg", ""))[:120])
    event = _events.get(key)
    if event is None:
        fields = {k: v for k, v in record.items() if k not in ("level", "ts", "logger", "caller", "msg")}
        event = _events[key] = {"logger": key[0], "msg": key[1], "t": _since_start(), "n": 0}
        if fields:
            event["fields"] = json.dumps(fields)[:240]
    event["n"] += 1
    return True


async def _sink(_info, reader, writer) -> None:
    """Count what arrives until EOF (or a reset), with the CLOCK_MONOTONIC time of the last byte: the
    sender's start and this time, both system-wide, give the transfer's duration across processes."""
    record = {"bytes": 0, "ended": "open", "first_byte_at": None, "last_byte_at": None}
    _sunk.append(record)
    try:
        while chunk := await reader.read(1 << 20):
            record["bytes"] += len(chunk)
            record["last_byte_at"] = time.monotonic()
            record["first_byte_at"] = record["first_byte_at"] or record["last_byte_at"]
        record["ended"] = "eof"
        writer.write(f"{record['bytes']}\n".encode())
        await writer.drain()
    except Exception as exc:
        record["ended"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        writer.close()


async def _send(p2p, peer_id, nbytes: int, timeout: float) -> dict:
    """Stream ``nbytes`` to ``peer_id``'s sink; how it ended on this side. The sink counts what arrived:
    p2pd closes the whole libp2p stream when its client half-closes, so the sink's answer rarely
    comes back."""
    started, sent, ended = time.monotonic(), 0, "written"
    try:
        async with asyncio.timeout(timeout):
            _, _reader, writer = await p2p.call_binary_stream_handler(peer_id, SINK)
            block = b"x" * BLOCK
            while sent < nbytes:
                writer.write(block[:min(BLOCK, nbytes - sent)])
                await writer.drain()
                sent += min(BLOCK, nbytes - sent)
            writer.write_eof()
    except Exception as exc:  # a relay's data or time limit resets the stream: the receiver says where
        ended = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
    return {"bytes_written": sent, "started_at": started, "write_s": round(time.monotonic() - started, 3),
            "ended": ended}


def _wire_maddr(text: str):
    """``text`` as the control protocol's connect wants it. hivemind's Multiaddr writes a /p2p/ component
    as a CIDv1 (01 72 + multihash), which go-multiaddr in p2pd rejects ("length greater than remaining
    number of bytes in buffer"); go writes the bare multihash. Same bytes otherwise."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    wire = Multiaddr(text).to_bytes()
    parts = text.split("/")
    for peer in (parts[i + 1] for i, p in enumerate(parts) if p == "p2p"):
        mh = PeerID.from_base58(peer).to_bytes()
        cid = b"\x01\x72" + mh
        wire = wire.replace(varint(421) + varint(len(cid)) + cid, varint(421) + varint(len(mh)) + mh)

    class Wire:
        def to_bytes(self) -> bytes:
            return wire

    return Wire()


async def _connection(p2p, peer_id) -> list[str]:
    return [str(a) for info in await p2p.list_peers() if info.peer_id == peer_id for a in info.addrs]


async def role(args: argparse.Namespace) -> None:
    """One daemon of the bench, inside its namespace; talks to the parent on stdout/stdin (JSON lines)."""
    os.environ["GOLOG_LOG_LEVEL"] = GOLOG_LEVEL  # hivemind only sets it when unset
    from hivemind.p2p import P2P, PeerID

    log_line = P2P._log_p2pd_message
    P2P._log_p2pd_message = staticmethod(lambda line: _capture_p2pd_line(line) or log_line(line))

    def say(**kw) -> None:
        print(json.dumps(kw), flush=True)

    opts = {"host_maddrs": [f"/ip4/{args.address}/tcp/0"]}
    if args.role == "T":
        opts.update(initial_peers=[args.relay], use_auto_relay=True, trusted_relays=[args.relay],
                    force_reachability="private")
    elif args.role == "C":
        opts.update(initial_peers=[args.relay])
    else:  # go-libp2p serves as a relay only once it believes itself public (AutoNAT needs peers to tell it)
        opts.update(force_reachability="public")
    p2p = await P2P.create(**opts)
    await p2p.add_binary_stream_handler(SINK, _sink)
    hello = {"peer_id": str(p2p.peer_id), "started_s": _since_start()}
    if args.role == "T":  # wait for the relay reservation
        deadline = time.monotonic() + args.reservation_timeout
        hello["reservation_s"] = None
        while time.monotonic() < deadline:
            if ("autorelay", "adding new relay") in _events:
                hello["reservation_s"] = _events[("autorelay", "adding new relay")]["t"]
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # let the host's address set catch up with the reservation
    hello["maddrs"] = [str(m) for m in await p2p.get_visible_maddrs(latest=True)]
    say(**hello)
    loop = asyncio.get_running_loop()
    while True:  # commands from the parent; read off the loop so that the sink and p2pd's log reader run
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "events":
            say(events=sorted(_events.values(), key=lambda e: e["t"]))
            continue
        if op == "count":
            say(count=len(_sunk))
            continue
        if op == "sunk":  # the count of the stream after the first ``index``, once it ended or stalled 5 s
            record = _sunk[cmd["index"]] if len(_sunk) > cmd["index"] else None
            seen, still = -1, time.monotonic()
            while record and record["ended"] == "open" and time.monotonic() - still < 5:
                if record["bytes"] != seen:
                    seen, still = record["bytes"], time.monotonic()
                await asyncio.sleep(0.2)
            say(**(record or {"bytes": None, "ended": "no stream arrived"}))
            continue
        peer = PeerID.from_base58(cmd["peer"])
        try:
            if op == "connect":
                started = time.monotonic()
                connecting = p2p._client.connect(peer, [_wire_maddr(cmd["maddr"])])
                await asyncio.wait_for(connecting, cmd.get("timeout", 30))
                say(seconds=round(time.monotonic() - started, 3), connection=await _connection(p2p, peer))
            elif op == "disconnect":
                await p2p._client.disconnect(peer)
                await asyncio.sleep(0.5)
                say(connection=await _connection(p2p, peer))
            elif op == "send":
                result = await _send(p2p, peer, cmd["bytes"], cmd["timeout"])
                say(**result, connection=await _connection(p2p, peer))
            elif op == "connection":
                say(connection=await _connection(p2p, peer))
        except Exception as exc:
            say(error=f"{type(exc).__name__}: {exc}"[:300], connection=await _connection(p2p, peer))
    await p2p.shutdown()


class Daemon:
    """One role's subprocess in its namespace. ``read`` gives up after a deadline, so a hung daemon
    cannot hang the bench; ``close`` asks it to quit, then kills it (the lab kills whatever is left
    in its namespaces, p2pd included)."""

    def __init__(self, lab, index: int, name: str, relay: str, reservation_timeout: float) -> None:
        self.name = name
        address = lab.hosts[index].address
        self.proc = subprocess.Popen(
            [*lab.exec_prefix(index), sys.executable, __file__, "--role", name, "--address", address,
             "--relay", relay, "--reservation-timeout", str(reservation_timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.hello: dict = {}

    def start(self, timeout: float) -> dict:
        self.hello = self.read(timeout)
        return self.hello

    def read(self, timeout: float = 120) -> dict:
        if not self.selector.select(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the bench daemon exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        """Send one command; wait for its answer up to the command's own timeout plus a margin."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(cmd.get("timeout", 30) + 30)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(20)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            self.selector.close()


def _summary(sent: dict, sunk: dict | None) -> dict:
    """Merge the sender's view with what the receiving sink counted. Seconds: from the sender opening the
    stream to the sink's last byte (CLOCK_MONOTONIC is system-wide, so the two processes' clocks agree)."""
    out = {k: v for k, v in sent.items() if k != "started_at"}
    delivered = sunk.get("bytes") if sunk else None
    out["bytes_delivered"] = delivered
    out["receiver_ended"] = sunk.get("ended") if sunk else None
    last = sunk.get("last_byte_at") if sunk else None
    seconds = last - sent["started_at"] if last else None
    out["seconds"] = round(seconds, 3) if seconds else None
    out["mb_per_s"] = round(delivered / seconds / 1e6, 3) if seconds and delivered else None
    # p2pd closes the whole libp2p stream when the sender half-closes, so the receiver often ends with
    # "Connection lost" after the last byte: complete means every byte arrived
    out["complete"] = delivered == sent["bytes_written"]
    out["via_relay"] = any("p2p-circuit" in a for a in out.get("connection", []))
    return out


def measure(link: str | None, nbytes: int, timeout: float, settle: float, reservation_timeout: float) -> dict:
    from swarm.sim.iptables import fetch_iptables, find_iptables
    from swarm.sim.link import LinkSpec
    from swarm.sim.netns import NetnsLab

    if find_iptables() is None:
        print("iptables is not installed: unpacking Debian's package into the cache", file=sys.stderr)
        fetch_iptables()
    spec = LinkSpec.parse(link) if link else None
    out: dict = {}
    with NetnsLab() as lab:
        for index in (0, 1):
            lab.add(index, spec)
        lab.add(2, spec, nat=True)
        daemons: list[Daemon] = []

        def start(index: int, name: str, relay: str = "", wait: float = 60) -> Daemon:
            daemon = Daemon(lab, index, name, relay, reservation_timeout)
            daemons.append(daemon)  # before its hello: close() it whatever happens next
            daemon.start(wait)
            return daemon

        try:
            relay = start(0, "R")
            relay_addr = next(m for m in relay.hello["maddrs"] if f"/{lab.hosts[0].address}/" in m)
            client = start(1, "C", relay_addr)
            client_addr = next(m for m in client.hello["maddrs"] if f"/{lab.hosts[1].address}/" in m)
            print(f"R {relay_addr}\nC {client_addr}\nT waiting up to {reservation_timeout:.0f} s for a "
                  f"reservation on R", file=sys.stderr)
            target = start(2, "T", relay_addr, wait=reservation_timeout + 60)
            t_id, c_id = target.hello["peer_id"], client.hello["peer_id"]
            circuit = f"{relay_addr}/p2p-circuit"  # T's own /p2p/ goes in the connect request's peer field
            out["reservation"] = {
                "seconds": target.hello["reservation_s"],  # from T's start; None: none within the timeout
                "circuit_address": circuit,
                "t_advertises_circuit": [m for m in target.hello["maddrs"] if "p2p-circuit" in m],
                "t_maddrs": target.hello["maddrs"],
            }
            print(f"T reservation after {target.hello['reservation_s']} s", file=sys.stderr)

            def stream(sender: Daemon, receiver: Daemon) -> dict:
                index = receiver.ask(op="count")["count"]
                sent = sender.ask(op="send", peer=receiver.hello["peer_id"], bytes=nbytes, timeout=timeout)
                return _summary(sent, receiver.ask(op="sunk", index=index))

            if target.hello["reservation_s"] is None:
                out["relayed"] = {"error": f"no relay reservation within {reservation_timeout:.0f} s",
                                  "reservation": None}
            else:
                # T's autorelay also reserves on C (every daemon serves as a relay, see BENCHMARKS.md), which
                # leaves a direct T->C connection that would carry C's streams: drop it first.
                out["c_to_t_before_dial"] = client.ask(op="connection", peer=t_id)["connection"]
                client.ask(op="disconnect", peer=t_id)
                out["connect"] = client.ask(op="connect", peer=t_id, maddr=circuit, timeout=30)
                if "error" in out["connect"]:
                    out["relayed"] = {"error": f"dial over the circuit failed: {out['connect']['error']}"}
                else:
                    out["relayed"] = stream(client, target)
                    time.sleep(settle)
                    out["connection_after_settle"] = client.ask(op="connection", peer=t_id)["connection"]
                    # a reset relayed connection is gone: dial the circuit again (a no-op if a connection,
                    # hole-punched or not, is still there), then stream once more
                    out["reconnect"] = client.ask(op="connect", peer=t_id, maddr=circuit, timeout=30)
                    out["after"] = stream(client, target)
            target.ask(op="disconnect", peer=c_id)
            out["direct_connect"] = target.ask(op="connect", peer=c_id, maddr=client_addr.split("/p2p/")[0],
                                               timeout=30)
            out["direct"] = stream(target, client)
            out["link_bytes"] = {name: lab.link_bytes(i) for i, name in enumerate("RCT")}
            out["log"] = {d.name: d.ask(op="events")["events"] for d in daemons}
            # the relay's own account of each relayed connection ("relayed N bytes from A to B", "relay
            # copy error: stream reset"), and whether DCUtR ever started (it waits for a public address)
            out["relay_said"] = [e["msg"] for e in out["log"]["R"] if e["logger"] == "relay" and
                                 e["msg"].startswith(("relayed ", "relay copy error"))]
            # "after" may well run over a direct connection that T dialled out itself (to C as a relay
            # candidate or DHT peer): only "started_on" says whether DCUtR could have made it
            out["hole_punch"] = {
                "started_on": [name for name, events in out["log"].items()
                               if any(e["msg"].startswith("Host now has a public address") for e in events)],
                "after_direct": bool(out.get("after")) and not out["after"]["via_relay"]
                and bool(out["after"].get("connection")),
            }
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            for daemon in daemons:
                daemon.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--link", default="80mbit",
                        help="every link's rate, tc style (default 80mbit; '' unshaped)")
    parser.add_argument("--bytes", type=int, default=16 << 20, help="bytes per stream (default 16 MiB)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per stream at most")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds between the relayed stream and the 'after' one (time for DCUtR)")
    parser.add_argument("--reservation-timeout", type=float, default=300.0,
                        help="seconds T waits for its relay reservation (autorelay's boot delay is 180)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--relay", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        asyncio.run(role(args))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: close the daemons and the lab
    out = measure(args.link or None, args.bytes, args.timeout, args.settle, args.reservation_timeout)
    out.update(link=args.link, bytes=args.bytes)
    for name in ("relayed", "after", "direct"):
        r = out.get(name)
        if r is None or "error" in r:
            print(f"{name:8s} {r and r['error']}", file=sys.stderr)
            continue
        print(f"{name:8s} delivered {r['bytes_delivered']} of {r['bytes_written']} B in {r['seconds']} s "
              f"({r['mb_per_s']} MB/s), sender {r['ended']}, receiver {r['receiver_ended']}; "
              f"via {r.get('connection')}", file=sys.stderr)
    if "error" in out:
        print(f"error: {out['error']}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
