"""ServerApp: runs the configured strategy and records every round on the aggregator.

Writes to `output-dir` (on the SuperLink host):
    events.jsonl          one JSON object per event, appended as the run goes
    models/round-N.pt     each round's global model (torch state_dict), round 0 included
    models/model.json     what is needed to rebuild the network for those weights
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from .settings import WEIGHTS, AppSettings
from .strategy import RecordedStrategy, build_strategy, timed_emitter
from .task import build_model, load_vector, to_vector

app = ServerApp()

REPLY_POLL_SECONDS = 0.25


class NodesMissing(RuntimeError):
    """Fewer SuperNodes than required connected in time."""


class PromptGrid(Grid):
    """The run's Grid, with replies pulled every 0.2 s instead of Flower's fixed 3 s.

    Every other call goes to the wrapped Grid unchanged.
    """

    def __init__(self, inner: Grid, on_phase: Callable[..., None] | None = None) -> None:
        self._inner = inner
        self.on_phase = on_phase

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        started = time.time()
        pending = set(self.push_messages(messages))
        pushed = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        arrivals: list[float] = []
        pulling = 0.0
        while pending:
            before = time.time()
            for reply in self.pull_messages(pending):
                replies.append(reply)
                arrivals.append(time.time())
                pending.discard(reply.metadata.reply_to_message_id)
            pulling += time.time() - before
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_SECONDS)
        if self.on_phase is not None and (replies or pending):
            self.on_phase(
                started=started, pushed=pushed, arrivals=arrivals, pulling=pulling, missing=len(pending)
            )
        return replies


class Recorder:
    def __init__(self, output_dir: Path, settings: AppSettings) -> None:
        self.settings = settings
        self.models = output_dir / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self._events = (output_dir / "events.jsonl").open("a", encoding="utf-8")
        self.emit = timed_emitter(self._write)
        (self.models / "model.json").write_text(
            json.dumps(
                {
                    "architecture": "fedfleet_app.task.Net",
                    "channels": settings.channels,
                    "num_classes": settings.num_classes,
                    "classes": list(settings.classes),
                    "image_size": settings.image_size,
                },
                indent=2,
            )
            + "\n"
        )

    def _write(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps(event) + "\n")
        self._events.flush()

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Save the global model after each round (Flower calls this with round 0 first)."""
        path = self.models / f"round-{server_round}.pt"
        tmp = path.with_suffix(".tmp")
        net = load_vector(
            build_model(self.settings.channels, self.settings.num_classes), arrays[WEIGHTS].numpy()
        )
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
        self.emit("round-end", round=server_round, model=str(path.relative_to(self.models.parent)))
        return None

    def close(self) -> None:
        self._events.close()


def wait_for_nodes(grid: Grid, needed: int, timeout: float, recorder: Recorder) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() >= deadline:
            raise NodesMissing(
                f"{len(nodes)} of {needed} SuperNodes connected within {timeout:.0f} s "
                "(node-wait-timeout); check that every participant's SuperNode is running "
                "and can reach the SuperLink"
            )
        time.sleep(0.2)
    recorder.emit("nodes", nodes=nodes)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    if not settings.output_dir:
        raise ValueError("run config output-dir is empty: fedfleet sets it to the run's directory")
    recorder = Recorder(Path(settings.output_dir), settings)
    recorder.emit("started", settings=settings.to_run_config(), flower_run_id=context.run_id)
    try:
        prompt_grid = PromptGrid(grid, lambda **timing: recorder.emit("phase", **timing))
        wait_for_nodes(prompt_grid, settings.min_participants, settings.node_wait_timeout, recorder)
        model = build_model(settings.channels, settings.num_classes, settings.model_seed)
        strategy = RecordedStrategy(build_strategy(settings), settings, recorder.emit)
        strategy.start(
            grid=prompt_grid,
            initial_arrays=ArrayRecord({WEIGHTS: Array(to_vector(model))}),
            num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout,
            evaluate_fn=recorder.checkpoint,
        )
        recorder.emit("finished", rounds=settings.num_server_rounds)
    except BaseException as err:
        recorder.emit("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        recorder.close()
