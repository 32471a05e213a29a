"""Train: submit the app with the operator's `flwr run`, then follow the ServerApp's events.

The ServerApp (on the aggregator) appends one JSON event per line to `events.jsonl` in
its output directory; they are read from the aggregator as they come (a local file, or
over the aggregator's SSH connection) and turned into the live per-round display. The
hosts are watched about once a second meanwhile (the fleet's `check`, which may start a
replacement SuperNode), and the SuperLink is asked for the run's status when the events
go quiet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedfleet_app.settings import AppSettings

from fedfleet.adapters.flwr import FlwrCli
from fedfleet.core.errors import RunFailed
from fedfleet.core.records import RunState
from fedfleet.hosts.base import Host

EVENTS = "events.jsonl"
STATUS_CHECK_AFTER = 20.0  # seconds without events before asking the SuperLink
SERVICE_CHECK_EVERY = 1.0  # seconds between asking the hosts what runs
EVENT_POLL = 0.2


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


def submit(cli: FlwrCli, app_dir: Path, run_config: Path) -> int:
    """`flwr run`: the app as a FAB to the SuperLink; Flower's run ID."""
    return cli.run(app_dir, run_config)


def follow(
    tail: EventTail,
    state: RunState,
    display: Display,
    cli: FlwrCli,
    flower_run_id: int,
    watch: Callable[[], None],
    settings: AppSettings,
) -> None:
    """Follow the ServerApp's events until it finishes; raise RunFailed if anything fails.
    `watch` is called about once a second (it may take a while: starting a replacement)."""
    # Waiting for the nodes, every round's train phase and the evaluate phase(s), plus slack.
    allowed = settings.node_wait_timeout + 60 + (settings.num_server_rounds + 1) * 2 * settings.round_timeout
    deadline = time.monotonic() + allowed
    last_news = time.monotonic()
    last_check = 0.0
    while True:
        new = tail.read()
        for event in new:
            state.apply(event)
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
                for event in tail.read():
                    state.apply(event)
                if state.status == "finished":
                    return
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
