"""Train: submit the app with the operator's `flwr run`, then follow the ServerApp's progress.

The built-in ServerApp (on the aggregator) appends one JSON event per line to
`events.jsonl` in its output directory; they are read from the aggregator as they come (a
local file, or over the aggregator's SSH connection). A Flower app of your own knows
nothing of that: its progress is read from the ServerApp's log as the SuperLink serves it
(`flwr log --stream`, parsed by `core.flowerlog`), and its outcome from the SuperLink's run
status. Either way the events become the live per-round display. The hosts are watched
about once a second meanwhile (the fleet's `check`, which may start a replacement
SuperNode), and the SuperLink is asked for the run's status when the events go quiet.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedfleet_app.settings import AppSettings

from fedfleet.adapters.flwr import FlwrCli
from fedfleet.adapters.processes import Managed, ProcessGroup
from fedfleet.core.errors import RunFailed
from fedfleet.core.flowerlog import LogReader
from fedfleet.core.records import RunState
from fedfleet.hosts.base import Host

EVENTS = "events.jsonl"
STATUS_CHECK_AFTER = 20.0  # seconds without events before asking the SuperLink
SERVICE_CHECK_EVERY = 1.0  # seconds between asking the hosts what runs
EVENT_POLL = 0.2
FINAL_LOG_WAIT = 1.0  # seconds between a foreign run's end and reading its whole log


class Display(Protocol):
    def update(self, state: RunState) -> None: ...


class EventTail:
    """New complete JSON lines of a file on a host that another process appends to."""

    def __init__(self, host: Host, path: str) -> None:
        self.host = host
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        chunk, size = self.host.read(self.path, self.offset)
        if size < 0:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


class LogTail:
    """A Flower app's progress from its ServerApp's log: `flwr log --stream`, parsed into the
    same events as the built-in app's. A stream that breaks before the run ends is started
    again (after 1, 2, 4 ... 30 s; it starts from the beginning, so what was read is skipped);
    when it ends, the SuperLink says how the run finished, and the log is read once more
    whole (`flwr log --show`): Flower uploads a ServerApp's last lines as it exits, which a
    stream that closed at the run's end may not have carried."""

    GIVE_UP_AFTER = 120.0  # seconds of a broken stream (while the run goes on) before failing

    def __init__(self, cli: FlwrCli, flower_run_id: int, procs: ProcessGroup, log: Path) -> None:
        self.cli, self.run_id, self.procs, self.log = cli, flower_run_id, procs, log
        self.reader = LogReader()
        self.fed = 0  # bytes of the log parsed so far (a restarted stream starts over)
        self.skip = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.proc: Managed | None = None
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.broken_since: float | None = None
        self.backoff = 1.0
        self.restart_at = 0.0
        self.done = False
        self.status: dict[str, Any] = {}

    def _start(self) -> None:
        argv, env = self.cli.log_command(self.run_id)
        self.proc = self.procs.start("flwr log (the ServerApp's output)", argv, env, self.log, pipes=True)
        if self.proc.popen.stdin is not None:
            self.proc.popen.stdin.close()
        stdout = self.proc.popen.stdout
        assert stdout is not None
        chunks = self.chunks = queue.Queue()
        self.skip = self.fed

        def pump() -> None:
            fd = stdout.fileno()
            while chunk := os.read(fd, 65536):
                chunks.put(chunk)
            chunks.put(None)

        threading.Thread(target=pump, name="flwr-log", daemon=True).start()

    def _feed(self, data: bytes) -> list[dict[str, Any]]:
        """New bytes of the log, past what a restarted stream sends again."""
        if self.skip:
            dropped = data[: self.skip]
            data = data[self.skip :]
            self.skip -= len(dropped)
        if data:
            self.broken_since, self.backoff = None, 1.0  # the stream works
        self.fed += len(data)
        return self.reader.feed(self.decoder.decode(data))

    def read(self) -> list[dict[str, Any]]:
        if self.done:
            return []
        if self.proc is None:
            if time.monotonic() < self.restart_at:
                return []
            self._start()
        ended = False
        data = b""
        while True:
            try:
                chunk = self.chunks.get_nowait()
            except queue.Empty:
                break
            if chunk is None:
                ended = True
                break
            data += chunk
        events = self._feed(data)
        if ended:
            events += self._ended()
        return events

    def _ended(self) -> list[dict[str, Any]]:
        """The stream closed: the run finished (as the SuperLink says), or the stream broke."""
        self._stop_stream()
        self.status = self.cli.status(self.run_id)
        if str(self.status.get("status", "")).startswith("finished"):
            return self.finish()
        now = time.monotonic()
        self.broken_since = self.broken_since or now
        if now - self.broken_since > self.GIVE_UP_AFTER:
            self.done = True
            return [{"event": "failed", "time": time.time(), "error": (
                f"the ServerApp's log stream (`flwr log`) broke for over {self.GIVE_UP_AFTER:.0f} s while "
                f"the run went on; see {self.log}")}]  # fmt: skip
        self.restart_at, self.backoff = now + self.backoff, min(self.backoff * 2, 30.0)
        return []

    def finish(self) -> list[dict[str, Any]]:
        """The run finished (the SuperLink says so): the rest of its log, then how it ended."""
        if self.done:
            return []
        self._stop_stream()
        if not self.status.get("status", "").startswith("finished"):
            self.status = self.cli.status(self.run_id)
        time.sleep(FINAL_LOG_WAIT)  # Flower uploads the last lines as the ServerApp exits
        whole = self.cli.show_log(self.run_id)
        events: list[dict[str, Any]] = []
        if whole is not None:
            self.skip = 0
            rest = whole.encode("utf-8")[self.fed :]
            events += self._feed(rest)
        self.done = True
        events += self.reader.feed(self.decoder.decode(b"", final=True)) + self.reader.close()
        state = str(self.status.get("status", ""))
        if state == "finished:completed":
            return [*events, {"event": "finished", "time": time.time()}]
        details = self.status.get("status-details") or "no details"
        return [*events, {"event": "failed", "time": time.time(), "error": f"Flower says {state}: {details}"}]

    def _stop_stream(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        self._stop_stream()


def submit(cli: FlwrCli, app_dir: Path, run_config: Path | None) -> int:
    """`flwr run`: the app as a FAB to the SuperLink; Flower's run ID."""
    return cli.run(app_dir, run_config)


def follow(
    tail: EventTail | LogTail,
    state: RunState,
    display: Display,
    cli: FlwrCli,
    flower_run_id: int,
    watch: Callable[[], None],
    settings: AppSettings,
    timeout: float | None = None,
    sink: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """Follow the ServerApp's events until it finishes; raise RunFailed if anything fails.
    `watch` is called about once a second (it may take a while: starting a replacement);
    `sink` gets every batch of events too (the registry's recorder).
    The run may take `timeout` seconds; by default what the built-in app's settings allow:
    waiting for the nodes, every round's train phase and the evaluate phase(s), plus slack."""
    allowed = timeout or (
        settings.node_wait_timeout + 60 + (settings.num_server_rounds + 1) * 2 * settings.round_timeout
    )
    deadline = time.monotonic() + allowed
    last_news = time.monotonic()
    last_check = 0.0

    def take(new: list[dict[str, Any]]) -> None:
        for event in new:
            state.apply(event)
        if new and sink is not None:
            sink(new)

    while True:
        new = tail.read()
        take(new)
        if new:
            last_news = time.monotonic()
            display.update(state)
        if state.status == "finished":
            return
        if state.status == "failed":
            raise RunFailed(f"the ServerApp failed: {state.error}")
        now = time.monotonic()
        if now - last_check >= SERVICE_CHECK_EVERY:
            watch()
            last_check = time.monotonic()
            deadline += last_check - now  # time spent starting a replacement does not count
        if now - last_news > STATUS_CHECK_AFTER:
            status = cli.status(flower_run_id)
            if str(status.get("status", "")).startswith("finished"):
                if isinstance(tail, LogTail):  # its stream may lag: read the whole log instead
                    tail.status = status
                    new = tail.finish()
                else:
                    new = tail.read()
                take(new)
                display.update(state)
                if state.status == "finished":
                    return
                if isinstance(tail, LogTail) and state.status == "failed":
                    raise RunFailed(f"the ServerApp failed: {state.error}")
                raise RunFailed(
                    f"Flower run {flower_run_id} ended as {status.get('status')}: "
                    f"{status.get('status-details')}. The ServerApp's log is the SuperLink's "
                    f"(runs/<run-id>/logs/aggregator-flower-superlink.log)"
                )
            last_news = now
        if now > deadline:
            cli.stop(flower_run_id)
            raise RunFailed(f"run did not finish within {allowed:.0f} s (and the time replacements took)")
        time.sleep(EVENT_POLL)
