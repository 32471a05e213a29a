"""Record: every run in the model registry (MLflow) as it goes, and what the registry answers.

During a run the controller hands each batch of the ServerApp's events to a `Recorder`,
which records them on a thread of its own, off the rounds' critical path: the round's
metrics (aggregate and per participant, the round as the step) and, for the built-in app,
the round's global model, read from the aggregator (`models/round-N.pt`, as the ServerApp
wrote it) and logged as an MLflow model of the PyTorch flavour. `fl/` knows nothing of
MLflow. A registry that fails mid-run costs the record, never the training: the errors go
into summary.json.

After runs: `listing`, `best` (criteria from core.registry) and `download` (an MLflow model
directory, a plain state_dict and model.json).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fedfleet_app.settings import AppSettings

from fedfleet.adapters.mlflow import TAG_ROUND, TAG_RUN, Registry, RegistryError, RunInfo, Store
from fedfleet.core import registry as names
from fedfleet.core.errors import ConfigError
from fedfleet.core.records import RunState
from fedfleet.core.registry import Candidate, Choice, Criteria
from fedfleet.core.stack import MODELS_PACKAGE, ModelSource
from fedfleet.core.util import atomic_write, closest
from fedfleet.hosts.base import Host, read_whole

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch (and the app's task module, which needs it) are imported where a model is handled:
# every fedfleet command imports this module, few of them touch a model.

DRAIN_SECONDS = 120.0  # how long the end of a run waits for the record to catch up
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


@dataclass(frozen=True)
class ModelKind:
    """How the controller rebuilds the built-in app's network for a round's weights."""

    settings: AppSettings
    source: ModelSource | None  # the stack's own network, or None: the built-in CNN

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.settings
        return (s.channels, s.image_size, s.image_size)

    def about(self) -> dict[str, Any]:
        s = self.settings
        return {
            "architecture": "fedfleet_app.task.Net" if self.source is None else self.source.setting,
            "classes": list(s.classes),
            "channels": s.channels,
            "image_size": s.image_size,
            "num_classes": s.num_classes,
            "input": f"float32 tensor (batch, {s.channels}, {s.image_size}, {s.image_size})",
        }


class ModelCode:
    """The network's code in a directory of its own, imported under the name it keeps inside
    the MLflow model (`code/`): the built-in CNN as `fedfleet_app.task`, the stack's own as
    `fedfleet_models.<file>`, so `mlflow.pytorch.load_model` finds it anywhere."""

    def __init__(self, kind: ModelKind, scratch: Path) -> None:
        from fedfleet_app import task

        self.kind = kind
        if kind.source is None:
            package, file = "fedfleet_app", Path(task.__file__)
        else:
            package, file = MODELS_PACKAGE, kind.source.file
        self.dir = scratch / package
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "__init__.py").write_text("")
        shutil.copyfile(file, self.dir / file.name)
        self.file = self.dir / file.name
        self.module_name = f"{package}.{file.stem}"
        self._module: ModuleType | None = None

    def module(self) -> ModuleType:
        from fedfleet_app import task

        if self.kind.source is None:
            return task
        if self._module is None:
            if MODELS_PACKAGE not in sys.modules:
                init = importlib.util.spec_from_file_location(MODELS_PACKAGE, self.dir / "__init__.py")
                assert init is not None and init.loader is not None
                package = importlib.util.module_from_spec(init)
                package.__path__ = [str(self.dir)]
                sys.modules[MODELS_PACKAGE] = package
            spec = importlib.util.spec_from_file_location(self.module_name, self.file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module_name] = module
            spec.loader.exec_module(module)
            self._module = module
        return self._module

    def build(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        from fedfleet_app import task

        s = self.kind.settings
        if self.kind.source is None:
            net: nn.Module = task.Net(s.channels, s.num_classes)
        else:
            factory = getattr(self.module(), self.kind.source.function)
            sys.modules[self.module_name] = self.module()  # pickled by this name
            net = factory(num_classes=s.num_classes, channels=s.channels, image_size=s.image_size)
        net.load_state_dict(dict(state))
        return net.eval()


def _warm_up() -> None:
    """What logging the first model imports (about a second of CPU)."""
    import mlflow.pytorch  # noqa: F401
    import torch  # noqa: F401
    from fedfleet_app import task  # noqa: F401


def requirements() -> list[str]:
    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]


class Recorder:
    """One run's record in the registry, written on a thread of its own as events come."""

    def __init__(
        self,
        registry: Registry,
        stack: str,
        run_id: str,
        *,
        kind: ModelKind | None,
        aggregator: Host,
        server_out: str,
        scratch: Path,
        local: Path | None = None,
    ) -> None:
        self.registry, self.stack, self.run_id = registry, stack, run_id
        self.kind, self.aggregator, self.server_out = kind, aggregator, server_out
        self.scratch = scratch
        self.local = local  # the run's directory here: a resumed run's earlier models are there
        self.broken: str | None = None  # why recording stopped (the store failed)
        self._pending: dict[int, dict[str, Any]] = {}  # a round's scores that came before its model
        self._stop = threading.Event()
        self.state = RunState(0)
        self.mlflow_run: str | None = None
        self.model_ids: dict[int, str] = {}
        self.errors: list[str] = []
        self.recorded_steps: set[int] = set()  # rounds whose model's scores are recorded
        self.train_steps: set[int] = set()
        self.server_steps: set[int] = set()
        self.guard_steps: set[tuple[str, int]] = set()  # rejected updates, privacy, per round
        self.seconds = 0.0  # spent recording, all told
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._code: ModelCode | None = None

    # -- the controller's side -------------------------------------------------------------

    def start(
        self, params: Mapping[str, str], tags: Mapping[str, str], *, resume: bool = False, done: int = 0
    ) -> None:
        """Open the run's record, then record on a thread of its own. A resumed run continues
        its record (what it holds is not recorded again); one the registry lacks starts anew."""
        earlier = self.registry.runs(self.stack, self.run_id) if resume else []
        if earlier:
            self.mlflow_run = earlier[0].mlflow_run_id
            self.registry.reopen(self.mlflow_run)
            for candidate in self.registry.rounds(earlier[0]):
                if candidate.round > done:  # recorded by an attempt past its last commit: done again
                    continue
                if candidate.model_id is not None:
                    self.model_ids[candidate.round] = candidate.model_id
                keys = list(candidate.metrics)
                if "accuracy" in keys or "loss" in keys:
                    self.recorded_steps.add(candidate.round)
                if any(k.startswith("train/") for k in keys):
                    self.train_steps.add(candidate.round)
                if any(k.startswith("server/") for k in keys):
                    self.server_steps.add(candidate.round)
            self.registry.log(self.mlflow_run, tags={**tags, "fedfleet.resumed": "true"})
        else:
            self.mlflow_run = self.registry.start_run(self.stack, self.run_id, tags)
            self.registry.log(self.mlflow_run, params=params)
        self._thread = threading.Thread(target=self._work, name="fedfleet-registry", daemon=True)
        self._thread.start()
        if self.kind is not None:
            self._queue.put(_warm_up)  # while the hosts are configured, not during round 1

    def events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._queue.put(lambda e=event: self._event(e))  # type: ignore[misc]

    def drain(self, timeout: float = DRAIN_SECONDS) -> dict[str, Any]:
        """Wait (at most `timeout` s) for what is queued; what summary.json says of the record.
        What is left after that is dropped (the thread stops at its next job)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._stop.set()
                self.errors.append(
                    f"the registry had not caught up {timeout:.0f} s after the run: later rounds were not "
                    f"recorded (`fedfleet run --resume {self.run_id}` of a stopped run records them)"
                )
        return self.info()

    @property
    def idle(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def info(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.registry.store.shown,
            "experiment": self.stack,
            "mlflow_run_id": self.mlflow_run,
            "models_recorded": len(self.model_ids),
            "record_seconds": round(self.seconds, 3),
            "errors": self.errors,
        }

    def close(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """The run's summary and settings beside its record, final figures, and its status
        (not while the recording thread still works: the record then stays RUNNING)."""
        if self.mlflow_run is None or self.broken is not None or not self.idle:
            return
        try:
            timings = {
                names.metric_key("time", k): float(v)
                for k, v in (summary.get("timings") or {}).items()
                if isinstance(v, int | float)
            }
            tags = {"fedfleet.status": str(summary.get("status"))}
            for p in summary.get("participants", []):
                if p.get("vm"):
                    tags[f"fedfleet.vm.{p['name']}"] = str(p["vm"])
            failovers = (summary.get("orchestration") or {}).get("failovers") or []
            tags["fedfleet.failovers"] = str(len(failovers))
            if summary.get("flower_status", {}).get("fab-hash"):
                tags["fedfleet.fab_hash"] = str(summary["flower_status"]["fab-hash"])
            self.registry.log(self.mlflow_run, metrics=timings, tags=tags)
            for name in ("summary.json", "run_config.toml"):
                if (run_dir / name).is_file():
                    self.registry.log_artifact(self.mlflow_run, run_dir / name)
            self.registry.end(self.mlflow_run, STATUS.get(str(summary.get("status")), "FAILED"))
        except RegistryError as err:
            self.errors.append(str(err))

    # -- the recording thread --------------------------------------------------------------

    def _work(self) -> None:
        # The lowest CPU priority (this thread only): on a busy controller, and on the local stack
        # where the Flower services share its cores, the rounds come first and the record after.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (job := self._queue.get()) is not None and not self._stop.is_set():
            if self.broken is not None:
                continue  # the store failed: what is queued is dropped, not retried one by one
            started = time.monotonic()
            try:
                job()
            except RegistryError as err:
                self.broken = str(err)
                self.errors.append(f"recording stopped: {err}")
            except Exception as err:  # a model that does not rebuild, a file that does not read
                self.errors.append(f"{type(err).__name__}: {err}")
            self.seconds += time.monotonic() - started
        # Scores still waiting for their model belong to a round that was never committed
        # (the run stopped first): not recorded; a resumed run scores that round again.

    def _event(self, event: dict[str, Any]) -> None:
        self.state.apply(event)
        kind = event.get("event")
        run = self.mlflow_run
        assert run is not None
        if kind == "evaluated":
            step = int(event["round"])
            if step in self.recorded_steps:  # a resumed run scores its last commit again
                return
            if self.kind is not None and step not in self.model_ids:
                self._pending[step] = event  # scored before its model was saved: linked when it is
                return
            self._log_scores(step, event)
        elif kind == "train-done":
            step = int(event["round"])
            if step not in self.train_steps:
                self.registry.log(run, metrics=names.train_metrics(event), step=step)
                self.train_steps.add(step)
        elif kind in ("rejected", "privacy"):  # updates screened out; the round's DP noise and clipping
            step = int(event["round"])
            if (kind, step) in self.guard_steps:
                return
            self.guard_steps.add((kind, step))
            metrics = (
                {"rejected_updates": float(len(event.get("updates", [])))}
                if kind == "rejected"
                else {
                    f"privacy/{k}": float(event[k])
                    for k in ("noise_multiplier", "clipping_norm", "noise_stddev")
                }
            )
            self.registry.log(run, metrics=metrics, step=step)
        elif kind == "server-evaluated":
            step = int(event["round"])
            if step in self.server_steps:
                return
            self.server_steps.add(step)
            self.registry.log(
                run, metrics=names.server_metrics(event), step=step, model_id=self.model_ids.get(step)
            )
        elif kind == "round-end":
            step = int(event["round"])
            if step in self.model_ids:
                return
            if event.get("model") and self.kind is not None:
                self.model_ids[step] = self._model(step, str(event["model"]))
                if step in self._pending:
                    self._log_scores(step, self._pending.pop(step))
            seconds = self.state.rounds[step].seconds if step in self.state.rounds else None
            if seconds is not None:
                self.registry.log(
                    run, metrics={"round_seconds": seconds}, step=step, model_id=self.model_ids.get(step)
                )

    def _log_scores(self, step: int, event: dict[str, Any]) -> None:
        assert self.mlflow_run is not None
        metrics = names.evaluation_metrics(event)
        self.registry.log(self.mlflow_run, metrics=metrics, step=step, model_id=self.model_ids.get(step))
        self.recorded_steps.add(step)

    def _model(self, step: int, relative: str) -> str:
        import torch

        assert self.kind is not None and self.mlflow_run is not None
        here = self.local / relative if self.local is not None else None
        if here is not None and here.is_file():  # a resumed run's earlier round, already collected
            data = here.read_bytes()
        else:
            data = read_whole(self.aggregator, f"{self.server_out}/{relative}")
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if self._code is None:
            self._code = ModelCode(self.kind, self.scratch)
        net = self._code.build(state)
        return self.registry.log_model(
            self.mlflow_run,
            net,
            step=step,
            name=f"round-{step}",
            input_shape=self.kind.input_shape,
            outputs=self.kind.settings.num_classes,
            code_paths=[str(self._code.dir)],
            metadata={**self.kind.about(), "run": self.run_id, "round": step, "stack": self.stack},
            tags={TAG_RUN: self.run_id, TAG_ROUND: str(step), "fedfleet.stack": self.stack},
            requirements=requirements(),
        )


# -- after runs ----------------------------------------------------------------------------


def open_registry(store: Store) -> Registry:
    registry = Registry(store)
    registry.check()
    return registry


def find_run(registry: Registry, run_id: str, stack: str | None = None) -> RunInfo:
    """A fedfleet run by its ID (or a unique prefix of it)."""
    runs = registry.runs(stack)
    exact = [r for r in runs if r.run_id == run_id]
    matches = exact or [r for r in runs if r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    where = f"stack {stack!r}" if stack else "the registry"
    if not matches:
        raise ConfigError(
            f"no run {run_id!r} in {where} ({registry.store.shown}); "
            f"{closest(run_id, [r.run_id for r in runs])} (fedfleet models list shows them)"
        )
    raise ConfigError(
        f"run {run_id!r} is ambiguous in {where}: {', '.join(r.run_id for r in matches[:5])}; give more of it"
    )


def listing(registry: Registry, stack: str | None, run_id: str | None) -> list[dict[str, Any]]:
    """Runs (newest first) with their rounds and each round's metrics."""
    runs = [find_run(registry, run_id, stack)] if run_id else registry.runs(stack)
    out = []
    for run in runs:
        rounds = registry.rounds(run)
        out.append(
            {
                "run": run.run_id,
                "stack": run.stack,
                "status": run.status,
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)),
                "mlflow_run_id": run.mlflow_run_id,
                "rounds": [
                    {
                        "round": c.round,
                        "model": c.model_id,
                        "metrics": {
                            k: v for k, v in c.metrics.items() if "/" not in k or k.startswith("train/")
                        },
                    }
                    for c in rounds
                ],
            }
        )
    return out


def candidates(registry: Registry, stack: str | None, run_id: str | None) -> list[Candidate]:
    runs = [find_run(registry, run_id, stack)] if run_id else registry.runs(stack)
    return [c for run in runs for c in registry.rounds(run) if c.model_id is not None]


def best(
    registry: Registry, stack: str, run_id: str | None, wanted: Criteria
) -> tuple[Choice, dict[str, Any]]:
    """The recommended round's model and why; tagged `fedfleet-<stack>@best` in the registry."""
    pool = candidates(registry, stack, run_id)
    if not pool:
        where = f"run {run_id}" if run_id else f"stack {stack!r}"
        raise ConfigError(
            f"{where} has no recorded round models in {registry.store.shown}: run `fedfleet run --stack {stack}` "
            "first (a Flower app of your own records metrics only)"
        )
    choice = names.choose(pool, wanted)
    out: dict[str, Any] = {
        "criteria": wanted.describe(),
        "considered": choice.considered,
        "reason": choice.reason(),
    }
    if choice.winner is not None:
        name, version = registry.register(
            stack,
            choice.winner,
            {"fedfleet.criteria": wanted.describe(), "fedfleet.reason": choice.reason()[:5000]},
        )
        out |= {
            "run": choice.winner.run,
            "round": choice.winner.round,
            "metrics": dict(choice.winner.metrics),
            "registered": {
                "name": name,
                "version": version,
                "alias": f"{name}@best",
                "uri": f"models:/{name}@best",
            },
            "download": f"fedfleet models download {choice.winner.run}:{choice.winner.round} -o DIR",
        }
    else:
        out |= {
            "qualifying": None,
            "rounds_meeting": choice.per_bound,
            "unmet": choice.unmet,
            "closest": None
            if choice.closest is None
            else {
                "run": choice.closest.run,
                "round": choice.closest.round,
                "metrics": dict(choice.closest.metrics),
            },
        }
    return choice, out


def resolve_model(registry: Registry, stack: str | None, spec: str) -> Candidate:
    """`RUN` (its last round), `RUN:N`, `RUN:best` (its best accuracy) or `best` (the stack's
    `fedfleet-<stack>@best`, as `fedfleet models best` left it)."""
    if spec == "best":
        if stack is None:
            raise ConfigError("`best` alone needs --stack: the best model is chosen per stack")
        found = registry.alias(stack)
        if found is None:
            raise ConfigError(
                f"stack {stack!r} has no best model yet: run `fedfleet models best --stack {stack} --metric ...`"
            )
        spec = f"{found[0]}:{found[1]}"
    run_part, sep, round_part = spec.partition(":")
    run = find_run(registry, run_part, stack)
    rounds = [c for c in registry.rounds(run) if c.model_id is not None]
    if not rounds:
        raise ConfigError(
            f"run {run.run_id} has no recorded round models (a Flower app of your own records metrics only)"
        )
    if not sep:
        return rounds[-1]
    if round_part == "best":
        choice = names.choose(rounds, Criteria("accuracy"))
        if choice.winner is None:
            raise ConfigError(f"run {run.run_id}: no round has an accuracy; name the round as {run.run_id}:N")
        return choice.winner
    try:
        number = int(round_part)
    except ValueError:
        raise ConfigError(
            f"{spec!r}: {round_part!r} is not a round; use RUN, RUN:N (a round number) or RUN:best"
        ) from None
    for c in rounds:
        if c.round == number:
            return c
    raise ConfigError(
        f"run {run.run_id} has no round {number}; its rounds: {', '.join(str(c.round) for c in rounds)}"
    )


def download(registry: Registry, chosen: Candidate, dest: Path) -> dict[str, Any]:
    """`dest/mlflow-model/` (load with mlflow.pytorch.load_model), `dest/state_dict.pt` and the
    network's source file (load with plain PyTorch), `dest/model.json` (what, how, scores)."""
    import mlflow.pytorch
    import torch

    assert chosen.model_id is not None
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty: choose another -o, or empty it")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        got = registry.download(chosen.model_id, Path(tmp) / "model")
        meta = json.loads(json.dumps(_mlmodel_metadata(got)))
        code = sorted((got / "code").glob("*/*.py"))
        net = mlflow.pytorch.load_model(str(got))
        torch.save(net.state_dict(), Path(tmp) / "state_dict.pt")
        source = next((f for f in code if f.name != "__init__.py"), None)
        if source is not None:
            shutil.copyfile(source, Path(tmp) / source.name)
        about = {
            "run": chosen.run,
            "round": chosen.round,
            "metrics": {k: v for k, v in chosen.metrics.items() if "/" not in k},
            "model_id": chosen.model_id,
            **{k: v for k, v in meta.items() if k not in ("run", "round", "stack")},
            "state_dict": "state_dict.pt",
            "source": None if source is None else source.name,
            "load": _how_to_load(meta, source),
        }
        atomic_write(Path(tmp) / "model.json", json.dumps(about, indent=2) + "\n")
        got.rename(dest / "mlflow-model")
        for name in ("state_dict.pt", "model.json", *([source.name] if source else [])):
            (Path(tmp) / name).rename(dest / name)
    return about | {"directory": str(dest)}


def _mlmodel_metadata(model_dir: Path) -> dict[str, Any]:
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load((model_dir / "MLmodel").read_text())
    return dict(data.get("metadata") or {})


def _how_to_load(meta: Mapping[str, Any], source: Path | None) -> dict[str, str]:
    out = {"mlflow": "mlflow.pytorch.load_model('mlflow-model')"}
    if source is None:
        return out
    arch = str(meta.get("architecture", ""))
    sizes = f"num_classes={meta.get('num_classes')}, channels={meta.get('channels')}"
    if arch == "fedfleet_app.task.Net":
        build = f"from {source.stem} import Net; net = Net({meta.get('channels')}, {meta.get('num_classes')})"
    else:
        function = arch.partition(":")[2] or "build"
        build = f"from {source.stem} import {function}; net = {function}({sizes}, image_size={meta.get('image_size')})"
    out["pytorch"] = f"{build}; net.load_state_dict(torch.load('state_dict.pt'))"
    return out
