"""MLflow as fedfleet's model registry: one experiment per stack, one MLflow run per
`fedfleet run`, every round's global model an MLflow model of the PyTorch flavour.

The store is MLflow's own: by default a SQLite database and an artifact folder under the
project (`runs/registry/`, no server needed); any tracking URI MLflow takes (a tracking
server, Databricks, ...) by `fedfleet:registry.trackingUri` or `MLFLOW_TRACKING_URI`.
mlflow is imported on first use: commands that do not record pay nothing for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from fedfleet.core.errors import FedfleetError
from fedfleet.core.registry import Candidate

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

DEFAULT_DIR = Path("runs") / "registry"
DB_FILE = "mlflow.db"
ARTIFACTS = "artifacts"
TAG_RUN = "fedfleet.run_id"
TAG_STACK = "fedfleet.stack"
TAG_ROUND = "fedfleet.round"
TAG_MODEL = "fedfleet.model_id"  # on a registered version: the logged model it was made from
BEST_ALIAS = "best"
# How an unreachable tracking server is found out: a few tries, 10 s each (MLflow's defaults
# retry for minutes). Set in the environment to change them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_CREDENTIALS = re.compile(r"//[^/@\s]+@")  # user:password@ in any URL
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's limits per log_batch
_lock = threading.RLock()  # MLflow's tracking URI is process-wide: one store at a time


class RegistryError(FedfleetError):
    """The registry cannot be used; the message names the store and the fix."""


@dataclass(frozen=True)
class Store:
    """Where the registry is and who said so."""

    uri: str
    source: str  # the setting that chose it (messages name it)
    artifacts: Path | None = None  # the default store's artifact folder

    @property
    def shown(self) -> str:
        """The URI without any user name or password in it."""
        parts = urlsplit(self.uri)
        if parts.username or parts.password:
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            return urlunsplit(parts._replace(netloc=netloc))
        return self.uri

    @property
    def local(self) -> bool:
        return self.artifacts is not None

    @property
    def database(self) -> Path | None:
        """The SQLite file of a sqlite:/// store."""
        if self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///"))
        return None


def resolve(project_dir: Path, setting: str | None, where: str) -> Store:
    """The stack's `fedfleet:registry.trackingUri` (`where` names it; a relative SQLite path
    is the project's), else MLFLOW_TRACKING_URI, else the project's own store. A SQLite store
    keeps its artifacts beside its database (MLflow's default is the current directory)."""
    if setting:
        uri, source = setting, where
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{(project_dir / uri.removeprefix('sqlite:///')).resolve()}"
    else:
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if not env:
            root = (project_dir / DEFAULT_DIR).resolve()
            return Store(f"sqlite:///{root / DB_FILE}", f"the project's store ({root})", root / ARTIFACTS)
        uri, source = env, "MLFLOW_TRACKING_URI"
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        return Store(f"sqlite:///{database}", source, database.parent / ARTIFACTS)
    return Store(uri, source)


@dataclass(frozen=True)
class RunInfo:
    """A fedfleet run as the registry holds it."""

    run_id: str  # fedfleet's
    mlflow_run_id: str
    stack: str
    status: str
    started: float  # seconds since the epoch
    metrics: Mapping[str, float]  # the last value of each metric
    tags: Mapping[str, str]


def _quiet() -> None:
    for name, level in (
        ("mlflow", logging.WARNING),
        ("mlflow.pytorch", logging.ERROR),
        ("alembic", logging.WARNING),
    ):
        logging.getLogger(name).setLevel(level)


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._mlflow_client: MlflowClient | None = None
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

    # -- MLflow, lazily --------------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, doing: str) -> Iterator[MlflowClient]:
        """This store's client (explicit URIs: MLflow's process-wide URI, which it mirrors in
        the environment, is never set; another thread may be starting processes); MLflow's
        errors become RegistryError naming the store and `doing`."""
        with _lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow
            from mlflow.exceptions import MlflowException

            _quiet()
            if self.store.local:
                assert self.store.artifacts is not None
                self.store.artifacts.mkdir(parents=True, exist_ok=True)
            if self._mlflow_client is None:
                self._mlflow_client = mlflow.MlflowClient(self.store.uri, self.store.uri)
            try:
                yield self._mlflow_client
            except MlflowException as err:
                raise RegistryError(self._explain(doing, err)) from err
            except OSError as err:
                raise RegistryError(self._explain(doing, err)) from err

    def _explain(self, doing: str, err: BaseException) -> str:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = _CREDENTIALS.sub(
            "//", first.replace(self.store.uri, self.store.shown)
        )  # MLflow echoes the URI
        text = f"the model registry at {self.store.shown} ({self.store.source}): {doing} failed: {first}"
        if "Max retries" in first or "Connection" in first or "resolve" in first or "timed out" in first:
            text += (
                "; the tracking server does not answer: start it, or point fedfleet:registry.trackingUri "
                "(or MLFLOW_TRACKING_URI) at one that does, or remove both to use the project's own store"
            )
        return text

    def check(self) -> None:
        """A real call to the store: it exists and answers (the default one is created)."""
        with self._using("reaching it") as client:
            client.search_experiments(max_results=1)

    # -- recording -------------------------------------------------------------------------

    def experiment(self, stack: str) -> str:
        with self._using(f"opening the experiment {stack!r}") as client:
            found = client.get_experiment_by_name(stack)
            if found is not None:
                if found.lifecycle_stage != "active":
                    raise RegistryError(
                        f"the model registry at {self.store.shown}: experiment {stack!r} is deleted; "
                        "restore it (mlflow experiments restore) or delete it for good"
                    )
                return str(found.experiment_id)
            location = (self.store.artifacts / stack).as_uri() if self.store.artifacts else None
            return str(client.create_experiment(stack, artifact_location=location, tags={TAG_STACK: stack}))

    def start_run(self, stack: str, run_id: str, tags: Mapping[str, str]) -> str:
        experiment = self.experiment(stack)
        with self._using(f"starting the record of run {run_id}") as client:
            run = client.create_run(
                experiment, run_name=run_id, tags={TAG_RUN: run_id, TAG_STACK: stack, **tags}
            )
            return str(run.info.run_id)

    def log(
        self,
        mlflow_run: str,
        *,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        model_id: str | None = None,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Metrics at `step` (linked to `model_id`), parameters and tags, in one request."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        entries: dict[str, list[Any]] = {
            "metrics": [
                Metric(k, float(v), now, step, model_id=model_id) for k, v in (metrics or {}).items()
            ],
            "params": [Param(k, v) for k, v in (params or {}).items()],
            "tags": [RunTag(k, v) for k, v in (tags or {}).items()],
        }
        with self._using("recording metrics") as client:
            for kind, items in entries.items():
                for i in range(0, len(items), BATCH[kind]):
                    client.log_batch(mlflow_run, **{kind: items[i : i + BATCH[kind]]})  # type: ignore[arg-type]

    def log_model(
        self,
        mlflow_run: str,
        net: nn.Module,
        *,
        step: int,
        name: str,
        input_shape: Sequence[int],
        outputs: int,
        code_paths: Sequence[str],
        metadata: Mapping[str, Any],
        tags: Mapping[str, str],
        requirements: Sequence[str],
    ) -> str:
        """The network as an MLflow model (PyTorch flavour, pickled with its code beside it so
        `mlflow.pytorch.load_model` rebuilds the module); its model ID."""
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs), "scores")]),
        )
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        with self._using(f"recording the model of {name}") as client, tempfile.TemporaryDirectory() as tmp:
            # What mlflow.pytorch.log_model does, through this store's client: the logged model in
            # the run's experiment, saved, its files stored, linked to the run at its step.
            experiment = client.get_run(mlflow_run).info.experiment_id
            model = client.create_logged_model(
                experiment, name=name, source_run_id=mlflow_run, tags=dict(tags), model_type="pytorch"
            )
            described = Model(run_id=mlflow_run, model_id=model.model_id, metadata=dict(metadata))
            mlflow.pytorch.save_model(
                net,
                str(Path(tmp) / "model"),
                mlflow_model=described,
                serialization_format="pickle",  # the module itself; pt2 export needs an example
                signature=signature,
                code_paths=list(code_paths),
                pip_requirements=list(requirements),  # not inferred: that takes seconds
            )
            client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
            client.log_outputs(mlflow_run, [LoggedModelOutput(model.model_id, step)])
            client.finalize_logged_model(model.model_id, "READY")
            return str(model.model_id)

    def log_artifact(self, mlflow_run: str, path: Path) -> None:
        with self._using(f"storing {path.name}") as client:
            client.log_artifact(mlflow_run, str(path))

    def reopen(self, mlflow_run: str) -> None:
        """A run's record goes on (a resumed run): RUNNING again."""
        with self._using("reopening the run's record") as client:
            client.update_run(mlflow_run, status="RUNNING")

    def end(self, mlflow_run: str, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        with self._using("closing the run's record") as client:
            client.set_terminated(mlflow_run, status)

    # -- reading ---------------------------------------------------------------------------

    def runs(self, stack: str | None = None, run_id: str | None = None) -> list[RunInfo]:
        """fedfleet's runs, newest first: of one stack, or all stacks; or the one run."""
        with self._using("listing runs") as client:
            experiments = client.search_experiments(max_results=1000)
            ids = [e.experiment_id for e in experiments if stack is None or e.name == stack]
            if not ids:
                return []
            query = f"tags.`{TAG_RUN}` = '{run_id}'" if run_id else ""
            found = client.search_runs(ids, query, max_results=5000, order_by=["attributes.start_time DESC"])
        return [
            RunInfo(
                run_id=r.data.tags.get(TAG_RUN, r.info.run_name or r.info.run_id),
                mlflow_run_id=r.info.run_id,
                stack=r.data.tags.get(TAG_STACK, ""),
                status=r.info.status,
                started=(r.info.start_time or 0) / 1000,
                metrics=dict(r.data.metrics),
                tags=dict(r.data.tags),
            )
            for r in found
            if TAG_RUN in r.data.tags
        ]

    def rounds(self, run: RunInfo) -> list[Candidate]:
        """Each round of a run: its model's metrics (the aggregate ones; per participant under
        `participant/...`) and the model's ID, round 0 (the initial model) first."""
        with self._using(f"reading the rounds of run {run.run_id}") as client:
            steps: dict[int, dict[str, float]] = {}
            for key in run.metrics:
                for m in client.get_metric_history(run.mlflow_run_id, key):
                    steps.setdefault(int(m.step), {})[key] = float(m.value)
            run_record = client.get_run(run.mlflow_run_id)
            experiment = run_record.info.experiment_id
            models: list[Any] = []
            token = None
            while True:  # every page (100 models each)
                page = client.search_logged_models(
                    experiment_ids=[experiment],
                    filter_string=f"source_run_id = '{run.mlflow_run_id}'",
                    page_token=token,
                )
                models += list(page)
                token = page.token
                if not token:
                    break
        by_round = {int(m.tags[TAG_ROUND]): m.model_id for m in models if TAG_ROUND in m.tags}
        numbers = sorted(set(steps) | set(by_round))
        return [
            Candidate(run.run_id, n, steps.get(n, {}), by_round.get(n), {"stack": run.stack}) for n in numbers
        ]

    def register(self, stack: str, winner: Candidate, tags: Mapping[str, str]) -> tuple[str, str]:
        """The winning round's model as a version of the registered model `fedfleet-<stack>`
        with the alias `best` (moved from any earlier winner); (name, version)."""
        assert winner.model_id is not None
        name = f"fedfleet-{stack}"
        from mlflow.exceptions import MlflowException

        with self._using(f"registering {winner.label} as {name}@{BEST_ALIAS}") as client:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(
                    name, description=f"fedfleet stack {stack}: the round models `fedfleet models best` chose"
                )
            existing = client.search_model_versions(f"name = '{name}'")
            version = next((v for v in existing if _model_of(v) == winner.model_id), None)
            if version is None:
                model = client.get_logged_model(winner.model_id)
                version = client.create_model_version(  # its files where this store keeps them
                    name,
                    model.artifact_location,
                    run_id=model.source_run_id,
                    model_id=winner.model_id,
                    tags={TAG_MODEL: winner.model_id},
                )
            for key, value in tags.items():
                client.set_model_version_tag(name, version.version, key, value)
            client.set_registered_model_alias(name, BEST_ALIAS, version.version)
            return name, str(version.version)

    def alias(self, stack: str, alias: str = BEST_ALIAS) -> tuple[str, str] | None:
        """(fedfleet run ID, round) of the version the alias points to; None without one."""
        from mlflow.exceptions import MlflowException

        with self._using(f"reading fedfleet-{stack}@{alias}") as client:
            try:
                version = client.get_model_version_by_alias(f"fedfleet-{stack}", alias)
            except MlflowException:
                return None
            model = client.get_logged_model(_model_of(version))
        return model.tags.get(TAG_RUN, ""), model.tags.get(TAG_ROUND, "")

    def download(self, model_id: str, dest: Path) -> Path:
        """The MLflow model directory of `model_id` into `dest` (which must not exist)."""
        from mlflow import artifacts

        with self._using(f"downloading model {model_id}") as client:
            dest.parent.mkdir(parents=True, exist_ok=True)
            location = client.get_logged_model(model_id).artifact_location  # where this store keeps it
            got = artifacts.download_artifacts(
                artifact_uri=location,
                dst_path=str(dest),
                tracking_uri=self.store.uri,
                registry_uri=self.store.uri,
            )
        return Path(got)


def _model_of(version: Any) -> str:
    """The logged model a registered version was made from."""
    return str(getattr(version, "model_id", None) or version.tags.get(TAG_MODEL, ""))


# -- the UI --------------------------------------------------------------------------------


def ui_command(store: Store, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow server` on this store, bound to 127.0.0.1: one worker, no job runner (the UI
    and its API only)."""
    import sys

    argv = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        store.uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if store.artifacts is not None:
        argv += ["--default-artifact-root", store.artifacts.as_uri()]
    env = dict(os.environ) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return argv, env


def ui_log(store: Store) -> Path:
    """Where `fedfleet ui` keeps the server's output: beside the store's database."""
    assert store.artifacts is not None, "the UI runs only on a SQLite store"
    return store.artifacts.parent / "ui.log"


def ui_ready(url: str) -> bool:
    """Whether the UI's API answers."""
    import urllib.error
    import urllib.request

    try:
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(api, timeout=2) as r:  # noqa: S310 (http://127.0.0.1 only)
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False
