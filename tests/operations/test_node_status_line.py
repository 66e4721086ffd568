"""`node start`'s live status line, and joining through a peer's /health URL.

Unit tests drive :class:`node.status_line.StatusLine` on fake terminals; the process test runs a real
`node start` on a pseudo-terminal (the status line redrawn in place) and a second one that joins with
``--join http://127.0.0.1:PORT`` on a pipe (plain status log lines).
"""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.status_line import CLEAR, RateWindow, StatusLine, format_status
from swarm.dht import maddrs_from_health, resolve_initial_peers
from swarm.sim.swarm import processes_mentioning

REPO = Path(__file__).resolve().parents[2]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_window_is_the_rate_over_the_window():
    rate = RateWindow(window_s=10)
    assert rate.update(0, now=0.0) == 0.0
    assert rate.update(100, now=5.0) == pytest.approx(20.0)
    assert rate.update(300, now=10.0) == pytest.approx(30.0)
    # Past the window the oldest samples drop: the rate follows the recent slope only.
    rate.update(300, now=20.0)
    assert rate.update(300, now=30.0) == pytest.approx(0.0)


def test_format_status_names_stage_peers_rate_loss_and_bytes():
    text = format_status({"state": "online", "stage": 1, "num_stages": 3, "peers": 5, "tokens_per_s": 2310.4,
                          "loss": 2.4123, "sent_per_s": 1.2e6, "received_per_s": 900, "bytes_sent": 84e6,
                          "bytes_received": 61e6})
    assert text == "online · stage 1/3 · 5 peers · 2,310 tok/s · loss 2.412 · ↑ 1.2 MB/s ↓ 900 B/s (84.0 MB / 61.0 MB)"
    replica = format_status({"state": "joining", "stage": None, "num_stages": 1, "peers": None, "loss": None})
    assert replica == "joining · 0 tok/s · ↑ 0 B/s ↓ 0 B/s (0 B / 0 B)"


def _snapshots(values):
    box = {"tokens": 0, "bytes_sent": 0, "bytes_received": 0, "state": "online", "stage": 0, "num_stages": 1,
           "peers": 2, "loss": 3.0}

    def snapshot():
        box["tokens"] += 1000
        box.update(values)
        return dict(box)
    return snapshot


def test_line_mode_redraws_in_place_and_other_output_erases_it_first():
    tty = FakeTTY()
    root = logging.getLogger()
    handler = logging.StreamHandler(tty)
    root.addHandler(handler)
    line = StatusLine(_snapshots({}), mode="auto", stream=tty, interval_s=0.05).start()
    try:
        assert line.mode == "line"
        deadline = time.monotonic() + 10
        while tty.getvalue().count(CLEAR) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "replica · 2 peers" in tty.getvalue() and "tok/s" in tty.getvalue()
        with line.lock:  # a log record arrives while the line is drawn
            line._drawn = True
            before = len(tty.getvalue())
            logging.getLogger("some.module").warning("a log line")
            written = tty.getvalue()[before:]
        assert written.startswith(CLEAR) and "a log line\n" in written  # erased, then the log line
    finally:
        line.stop()
        root.removeHandler(handler)
    assert handler.stream is tty  # the wrapper is gone after stop
    assert "\n" not in tty.getvalue().replace("a log line\n", "")  # the status itself never scrolls


def test_log_mode_writes_plain_lines_without_control_characters(caplog):
    pipe = io.StringIO()  # not a terminal
    line = StatusLine(_snapshots({}), mode="auto", stream=pipe, log_every_s=0.05)
    assert line.mode == "log"
    with caplog.at_level(logging.INFO, logger="node.status"):
        line.start()
        deadline = time.monotonic() + 10
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        line.stop()
    assert len(caplog.records) >= 2 and caplog.records[0].getMessage().startswith("status: online · replica")
    assert pipe.getvalue() == ""  # nothing drawn on the stream itself


def test_a_failing_snapshot_does_not_stop_the_line():
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("not ready")
        return {"state": "starting"}
    tty = FakeTTY()
    line = StatusLine(snapshot, mode="line", stream=tty, interval_s=0.02).start()
    deadline = time.monotonic() + 10
    while "starting" not in tty.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    line.stop()
    assert "starting" in tty.getvalue()
    with pytest.raises(ValueError, match="status mode"):
        StatusLine(snapshot, mode="fancy")


def test_join_urls_resolve_through_health_and_drop_loopback_for_remote_hosts(monkeypatch):
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = {"maddrs": ["/ip4/127.0.0.1/tcp/5/p2p/QmA", "/ip4/172.18.0.2/tcp/5/p2p/QmA"], "state": "online"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data = json.dumps(body if self.path == "/health" else {"nope": 1}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert maddrs_from_health(url) == body["maddrs"]  # a loopback URL keeps loopback addresses
        assert maddrs_from_health(url + "/health") == body["maddrs"]
        # Seen from another machine (a container), the node's loopback address would be the reader's own.
        real = __import__("urllib.request").request.urlopen
        monkeypatch.setattr("urllib.request.urlopen",
                            lambda u, timeout: real(u.replace("bootstrap", "127.0.0.1"), timeout=timeout))
        assert maddrs_from_health(f"http://bootstrap:{server.server_port}") == ["/ip4/172.18.0.2/tcp/5/p2p/QmA"]
        maddrs, errors = resolve_initial_peers(["/ip4/1.2.3.4/tcp/1/p2p/QmB", url, "http://127.0.0.1:1"])
        assert maddrs == ["/ip4/1.2.3.4/tcp/1/p2p/QmB", *body["maddrs"]]
        assert len(errors) == 1 and errors[0].startswith("http://127.0.0.1:1:")
        body["maddrs"] = []
        assert resolve_initial_peers([url]) == ([], [f"{url}: that node is not in a swarm yet"])
    finally:
        server.shutdown()


def _node(args: list[str], home: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "start", "--identity", str(home / "id.key"), "--metrics-port", "0",
         "--metrics-host", "127.0.0.1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
         "--set", f"train.checkpoint_dir='{home / 'ckpt'}'", "--set", "swarm.refresh_s=1", *args],
        cwd=REPO, start_new_session=True, **kw,
    )


def _read_fd_until(fd: int, pattern: str, timeout: float, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536).decode(errors="replace")
        except OSError:  # the pty closed: the process is gone
            break
        if not chunk:
            break
        seen.append(chunk)
        match = re.search(pattern, "".join(seen))
        if match:
            return match
    raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{''.join(seen)[-3000:]}")


@pytest.mark.timeout(300)
def test_node_start_on_a_terminal_draws_the_status_line_and_a_url_joiner_logs_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    primary, secondary = pty.openpty()
    first = _node([], tmp_path / "a", stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    second = None
    seen: list[str] = []
    try:
        port = _read_fd_until(primary, r"metrics: http://127\.0\.0\.1:(\d+)/", 60, seen).group(1)
        # A joiner given only the first node's metrics URL; its output is a pipe: plain status log lines.
        second = _node(["--join", f"http://127.0.0.1:{port}", "--status-every", "1"], tmp_path / "b",
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # The first node's terminal: the line redrawn in place, naming the state, peers, its training rate
        # (a replica trains the whole model: never 0 tok/s once it runs), loss, its memory and bytes.
        _read_fd_until(primary, re.escape(CLEAR) + r"online · replica · 2 peers · [1-9][\d,]* tok/s · loss [\d.]+ · "
                       r"cpu [\d.]+ GB \(peak [\d.]+\)", 120, seen)  # (cut at the terminal's 80 columns)
        joiner: list[str] = []
        _read_fd_until(second.stdout.fileno(), r"status: online · replica · 2 peers · [1-9][\d,]* tok/s", 120, joiner)
        assert "\x1b[" not in "".join(joiner)  # no terminal control codes in plain logs
        for proc in (second, first):
            proc.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0 and first.wait(60) == 0
        try:
            while select.select([primary], [], [], 0.5)[0] and (chunk := os.read(primary, 65536)):
                seen.append(chunk.decode(errors="replace"))
        except OSError:
            pass
        tail = "".join(seen).rsplit(CLEAR, 1)[-1]
        assert "stopped" in tail  # the last status line was erased before the shutdown logs
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        os.close(primary)
    assert processes_mentioning(str(tmp_path)) == []
