"""ServerApp: runs the configured strategy and records every round on the aggregator.

Writes to `output-dir` (on the SuperLink host):
    events.jsonl          one JSON object per event, appended as the run goes
    models/round-N.pt     each round's global model (torch state_dict), round 0 included
    models/model.json     what is needed to rebuild the network for those weights
    checkpoints/round-N.npz, .json
                          the last two rounds' commits: the global weights and the strategy's
                          server state (round-N.json, written last, holds the .npz's SHA-256);
                          what `fedfleet run --resume` continues from
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from .settings import WEIGHTS, AppSettings, model_file
from .strategy import RecordedStrategy, build_strategy, timed_emitter
from .task import build_model, load_vector, to_vector

app = ServerApp()

REPLY_POLL_SECONDS = 0.25
# Written by fedfleet beside the events (see Fleet).
FLEET_FILE = "fleet.json"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def write_durably(path: Path, data: bytes) -> None:
    """Write then rename, flushed to disk: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_checkpoint(
    directory: Path, server_round: int, weights: np.ndarray, state: dict[str, np.ndarray], strategy: str
) -> Path:
    """A round's commit: weights and strategy state (.npz), then its manifest (.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"weights": weights, **{f"state/{k}": v for k, v in state.items()}}
    np.savez(buffer, allow_pickle=False, **arrays)
    data = buffer.getvalue()
    write_durably(directory / f"round-{server_round}.npz", data)
    manifest = {
        "round": server_round,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "strategy": strategy,
        "state": sorted(state),
    }
    write_durably(directory / f"round-{server_round}.json", (json.dumps(manifest, indent=2) + "\n").encode())
    for old in directory.glob("round-*.json"):
        number = int(old.stem.removeprefix("round-"))
        if number <= server_round - KEEP_CHECKPOINTS:
            old.unlink(missing_ok=True)
            old.with_suffix(".npz").unlink(missing_ok=True)
    return directory / f"round-{server_round}.npz"


def load_checkpoint(path: Path) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    """(round, weights, strategy state) of a checkpoint whose manifest vouches for it."""
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
        data = path.read_bytes()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({err})") from err
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path}: its SHA-256 does not match {manifest_path.name} (corrupted)"
        )
    with np.load(io.BytesIO(data)) as npz:
        weights = npz["weights"]
        state = {k.removeprefix("state/"): npz[k] for k in npz.files if k.startswith("state/")}
    return int(manifest["round"]), weights, state


class NodesMissing(RuntimeError):
    """Fewer SuperNodes than required connected in time."""


class Fleet:
    """What the orchestrator says about the run's SuperNodes (`<output-dir>/fleet.json`).

    fedfleet watches the participant VMs far more often than Flower's heartbeat (a dead
    SuperNode counts as online for up to 60 s): when one dies it lists the node as lost
    here and starts a replacement on the participant's next VM. `expected` is how many
    participants still have a SuperNode (or one on its way). Without the file (e.g.
    under the simulation engine) nothing is lost and min-participants are expected.
    """

    def __init__(self, path: Path | None, default_expected: int) -> None:
        self.path = path
        self.default_expected = default_expected

    def read(self) -> tuple[set[int], int]:
        if self.path is None:
            return set(), self.default_expected
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return set(), self.default_expected
        lost = {int(n) for n in data.get("lost", [])}
        return lost, int(data.get("expected", self.default_expected))


class PromptGrid(Grid):
    """The run's Grid, with replies pulled every 0.25 s instead of Flower's fixed 3 s,
    and the orchestrator's word on lost SuperNodes.

    - Messages to a node the orchestrator lists as lost are given up at once, so a phase
      does not wait out its timeout (or Flower's heartbeat) for a dead SuperNode.
    - Node sampling waits, at most `node_wait` seconds, until the expected number of
      participants is connected (a replacement SuperNode may be starting); after that it
      goes on with those connected if they are at least `min_nodes`, or raises
      NodesMissing. Flower's own sampling would wait forever.

    Every other call goes to the wrapped Grid unchanged.
    """

    def __init__(
        self,
        inner: Grid,
        on_phase: Callable[..., None] | None = None,
        *,
        fleet: Fleet | None = None,
        min_nodes: int = 1,
        node_wait: float = 120.0,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self._inner = inner
        self.on_phase = on_phase
        self.fleet = fleet or Fleet(None, min_nodes)
        self.min_nodes = min_nodes
        self.node_wait = node_wait
        self.emit = emit or (lambda *_, **__: None)
        self._sampled: list[int] | None = None

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

    def connected(self) -> list[int]:
        """Connected nodes the orchestrator has not given up."""
        lost, _ = self.fleet.read()
        return [n for n in self._inner.get_node_ids() if n not in lost]

    def get_node_ids(self) -> Iterable[int]:
        # Flower's strategies ask twice per sampling (how many, then which): both get the
        # answer of one wait, so the wait is not doubled and the count cannot shrink between
        # them (Flower would then wait forever). The next phase's send clears it.
        if self._sampled is None:
            self._sampled = self._wait_for_nodes()
        return list(self._sampled)

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.node_wait
        while True:
            nodes = self.connected()
            _, expected = self.fleet.read()
            if len(nodes) >= max(expected, self.min_nodes):
                return nodes
            if time.monotonic() >= deadline:
                if len(nodes) >= self.min_nodes:
                    self.emit("short", nodes=nodes, expected=expected)
                    return nodes
                raise NodesMissing(
                    f"{len(nodes)} SuperNodes connected, fewer than min-participants={self.min_nodes}, "
                    f"after waiting {self.node_wait:.0f} s (node-wait-timeout); check that every "
                    "participant's SuperNode is running and can reach the SuperLink"
                )
            time.sleep(REPLY_POLL_SECONDS)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._sampled = None  # the next sampling waits afresh
        started = time.time()
        ids = list(self.push_messages(messages))
        # Flower returns no IDs for messages it could not push (e.g. too large): no reply comes.
        destination = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=False) if i}
        pending = set(destination)
        pushed = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        arrivals: list[float] = []
        given_up: list[int] = []
        pulling = 0.0
        while pending:
            before = time.time()
            for reply in self.pull_messages(pending):
                replies.append(reply)
                arrivals.append(time.time())
                pending.discard(reply.metadata.reply_to_message_id)
            pulling += time.time() - before
            lost, _ = self.fleet.read()
            for message_id in [m for m in pending if destination[m] in lost]:
                pending.discard(message_id)
                given_up.append(destination[message_id])
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(REPLY_POLL_SECONDS)
        if given_up:
            self.emit("lost", nodes=given_up)
        if self.on_phase is not None and (replies or pending or given_up):
            self.on_phase(
                started=started,
                pushed=pushed,
                arrivals=arrivals,
                pulling=pulling,
                missing=len(pending) + len(given_up),
            )
        return replies


class Recorder:
    def __init__(self, output_dir: Path, settings: AppSettings) -> None:
        self.settings = settings
        self.models = output_dir / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self._events = (output_dir / "events.jsonl").open("a", encoding="utf-8")
        self.emit = timed_emitter(self._write)
        sizes = {
            "num_classes": settings.num_classes,
            "channels": settings.channels,
            "image_size": settings.image_size,
        }
        about: dict[str, Any] = {
            "architecture": settings.model or "fedfleet_app.task.Net",
            "channels": settings.channels,
            "num_classes": settings.num_classes,
            "classes": list(settings.classes),
            "image_size": settings.image_size,
        }
        if settings.model:
            # The stack's own network: its file beside the weights, and how to call it, so
            # the models directory alone rebuilds it (README: "Your own model").
            source = model_file(settings.model)
            if source is None:
                raise ValueError(f"model {settings.model}: its module is not in this app")
            shutil.copyfile(source, self.models / Path(source).name)
            about["factory"] = {
                "file": Path(source).name,
                "function": settings.model.partition(":")[2],
                "kwargs": sizes,
            }
        (self.models / "model.json").write_text(json.dumps(about, indent=2) + "\n")

    def _write(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps(event) + "\n")
        self._events.flush()

    def checkpoint(
        self, server_round: int, arrays: ArrayRecord, strategy: RecordedStrategy | None = None
    ) -> MetricRecord | None:
        """Save the global model after each round (Flower calls this with round 0 first), and
        commit the round (weights and the strategy's state) before the next one starts."""
        path = self.models / f"round-{server_round}.pt"
        tmp = path.with_suffix(".tmp")
        settings = self.settings
        weights = arrays[WEIGHTS].numpy()
        net = load_vector(
            build_model(
                settings.channels, settings.num_classes, model=settings.model, image_size=settings.image_size
            ),
            weights,
        )
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
        state = strategy.state() if strategy is not None else {}
        saved = save_checkpoint(
            self.models.parent / CHECKPOINTS, server_round, weights, state, settings.strategy
        )
        self.emit(
            "round-end",
            round=server_round,
            model=str(path.relative_to(self.models.parent)),
            checkpoint=str(saved.relative_to(self.models.parent)),
        )
        return None

    def close(self) -> None:
        self._events.close()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    if not settings.output_dir:
        raise ValueError("run config output-dir is empty: fedfleet sets it to the run's directory")
    recorder = Recorder(Path(settings.output_dir), settings)
    recorder.emit("started", settings=settings.to_run_config(), flower_run_id=context.run_id)
    try:
        fleet = Fleet(Path(settings.output_dir) / FLEET_FILE, settings.min_participants)
        prompt_grid = PromptGrid(
            grid,
            lambda **timing: recorder.emit("phase", **timing),
            fleet=fleet,
            min_nodes=settings.min_participants,
            node_wait=settings.node_wait_timeout,
            emit=recorder.emit,
        )
        recorder.emit("nodes", nodes=list(prompt_grid.get_node_ids()))
        model = build_model(
            settings.channels,
            settings.num_classes,
            settings.model_seed,
            model=settings.model,
            image_size=settings.image_size,
        )
        strategy = RecordedStrategy(build_strategy(settings), settings, recorder.emit)

        def commit(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return recorder.checkpoint(server_round, arrays, strategy)

        if settings.resume_from:
            done, weights, state = load_checkpoint(Path(settings.resume_from))
            restored = strategy.restore(state)
            recorder.emit("resumed", round=done, restored=restored)
            strategy.resume(
                prompt_grid,
                ArrayRecord({WEIGHTS: Array(weights)}),
                done + 1,
                settings.num_server_rounds,
                settings.round_timeout,
                commit,
            )
        else:
            strategy.start(
                grid=prompt_grid,
                initial_arrays=ArrayRecord({WEIGHTS: Array(to_vector(model))}),
                num_rounds=settings.num_server_rounds,
                timeout=settings.round_timeout,
                evaluate_fn=commit,
            )
        recorder.emit("finished", rounds=settings.num_server_rounds)
    except BaseException as err:
        recorder.emit("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        recorder.close()
