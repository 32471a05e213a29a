"""Preflight: what the controller checks before anything starts.

The participants' data: on the local stack fedfleet writes the demo partitions when the stack asks for them,
then loads every site's data as its ClientApp will, so a bad file is named before any
process starts. On real hosts the data is the site's own and stays there: the
SuperNode role checks that its path exists on the VM, and the examples each site
trained on are reported by the rounds.

The SuperLink's port on the local stack (on real hosts the SuperLink role checks it).

A Flower app of your own (`fedfleet:app.path`): the node config it reads, its dependencies
(installed into its own environment here) and its components, which must import there.

The stack's own model (`fedfleet:app.model`): built once here, in a process of its own
(torch, and the user's code, stay out of fedfleet's), and fed a batch of the stack's
image size: a factory that is missing, fails, or gives the wrong number of outputs is
named before any host is touched.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fedfleet_app import data as app_data
from fedfleet_app.settings import AppSettings

from fedfleet.adapters import pip
from fedfleet.adapters.flwr import APP_SCRIPTS, build_fab, flower_env
from fedfleet.core import flowerapp
from fedfleet.core.errors import ConfigError, DataError, EnvironmentProblem, FedfleetError
from fedfleet.core.paths import StackPaths, data_path
from fedfleet.core.stack import NODE_KEYS, PROJECT, StackConfig
from fedfleet.hosts.base import Host


def data(stack: StackConfig, project_dir: Path, settings: AppSettings) -> dict[str, dict[str, int]]:
    """Per local participant, its train and test examples (empty for a stack of real hosts)."""
    if not stack.is_local or stack.flower_app is not None:  # a foreign app's: checked with the app
        return {}
    paths = _sites(stack, project_dir, settings.test_fraction)
    counts = {}
    for index, (name, path) in enumerate(paths.items()):
        try:
            train, test = app_data.load_site(path, settings.data_spec)
        except app_data.DataError as err:
            raise DataError(
                f"participant {name!r} ({stack.path}: {PROJECT}:participants[{index}].dataPath "
                f"= {path}): {err}"
            ) from err
        counts[name] = {"train": len(train), "test": len(test)}
    return counts


def _sites(stack: StackConfig, project_dir: Path, test_fraction: float) -> dict[str, Path]:
    """The local sites' data paths, with the demo partitions written there if the stack has them."""
    paths = {p.name: data_path(stack, project_dir, p.name) for p in stack.participants}
    if stack.demo is not None:
        app_data.write_demo(
            list(paths.values()),
            iid=stack.demo.partition == "iid",
            alpha=stack.demo.alpha,
            seed=stack.demo.seed,
            test_fraction=test_fraction,
        )
    return paths


def superlink_port(stack: StackConfig, aggregator: Host, address: str) -> None:
    """The local SuperLink's ports are free (the proxy's at `address`, the SuperLink's own on
    loopback), or held by the aggregator's own running services.

    (A participant VM's port is checked by the SuperNode role's preflight: a VM whose port
    is taken fails to start and the participant's next VM takes over.)"""
    if not stack.is_local or aggregator.status().reachable:
        return  # real hosts: the role checks; local: its services run (a `fedfleet configure` before)
    for host, port, key in (
        (address, stack.aggregator.port, "port"),
        ("127.0.0.1", stack.aggregator.internal_port, "internalPort"),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers do: connections in TIME_WAIT from a run that just ended
            # must not count, a socket still listening must.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as err:
                raise EnvironmentProblem(
                    f"port {host}:{port} ({stack.path}: {PROJECT}:aggregator.{key}) is already in use "
                    f"({err.strerror}). Stop whatever listens there (`ss -ltnp 'sport = :{port}'` "
                    "shows it) or change that key to a free port"
                ) from err


def _check(
    argv: list[str], cwd: Path | None, env: dict[str, str] | None, doing: str, checking: str
) -> dict[str, Any]:
    """Run a check script in a process of its own; its JSON reply (its last line of output)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, check=False, cwd=cwd, env=env
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{doing} took over 300 s") from None
    lines = done.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise ConfigError(f"{checking} failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1])
    return dict(json.loads(lines[-1]))


MODEL_CHECK = """
import json, sys
from fedfleet_app import task
ref, path, channels, classes, size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
try:
    task.use_model_file(ref, path)
    net = task.build_model(channels, classes, model=ref, image_size=size)
    task.check_model(net, ref, channels, classes, size)
    count = sum(p.numel() for p in net.parameters())
    print(json.dumps({"ok": True, "parameters": count, "class": type(net).__name__}))
except task.ModelError as err:
    print(json.dumps({"ok": False, "error": str(err)}))
"""


def model(stack: StackConfig, settings: AppSettings) -> dict[str, object] | None:
    """Build the stack's own model once for its sizes; what it is (None: the built-in CNN).
    Raise ConfigError naming `fedfleet:app.model` if it cannot serve."""
    source = stack.model
    if source is None:
        return None
    argv = [
        sys.executable, "-c", MODEL_CHECK, settings.model, str(source.file),
        str(settings.channels), str(settings.num_classes), str(settings.image_size),
    ]  # fmt: skip
    where = f"{stack.path}: {PROJECT}:app.model"
    reply = _check(
        argv, None, None, f"{where}: building {source.setting}", f"{where}: checking {source.setting}"
    )
    if not reply["ok"]:
        raise ConfigError(
            f"{stack.path}: {PROJECT}:app.model: {reply['error']} ({source.file}; the function is called "
            "as function(num_classes=, channels=, image_size=) and returns a torch.nn.Module)"
        )
    return {"model": source.setting, "class": reply["class"], "parameters": reply["parameters"]}


APP_CHECK = """
import importlib, json, sys, traceback
app_dir, refs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, app_dir)
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
for key, ref in refs.items():
    module, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except BaseException as err:
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        print(json.dumps({"ok": False, "key": key, "error": f"importing {ref} failed: {last}"}))
        sys.exit(0)
    if not isinstance(obj, kinds[key]):
        print(json.dumps({"ok": False, "key": key,
                          "error": f"{ref} is a {type(obj).__name__}, not a Flower {kinds[key].__name__}"}))
        sys.exit(0)
print(json.dumps({"ok": True}))
"""


def flower_app(stack: StackConfig, project_dir: Path, paths: StackPaths, staged: Path) -> dict[str, object]:
    """A Flower app of your own (`staged`: the copy `flwr run` will get), checked before any
    host is touched: Flower builds its FAB (its own checks of the pyproject, the files and the
    size); every node-config key the code in the FAB reads without a default is set for every
    participant; on the local stack the sites' data directories exist if it reads data-path;
    its dependencies install (into its own environment on this machine, which the local
    stack's hosts run it in); its ServerApp and ClientApp import there from the FAB's files and
    are what Flower runs. What it is, for the run's summary."""
    source = stack.flower_app
    assert source is not None
    app = source.app
    with tempfile.TemporaryDirectory(prefix="fedfleet-appcheck-") as scratch:
        tmp = Path(scratch)
        try:
            fab = build_fab(staged, tmp / "build")
        except FedfleetError as err:
            raise ConfigError(f"{app.pyproject}: {err}") from err
        unpacked = tmp / "fab"
        with zipfile.ZipFile(fab) as archive:
            archive.extractall(unpacked)  # our own build of a copy we made: names are plain
        reads = flowerapp.node_config_reads(unpacked)  # the code in the FAB, scanned once
        _node_config(stack, reads, app)
        _local_sites(stack, project_dir, reads)
        try:
            env = pip.app_env(
                paths.app_env(flowerapp.env_key(app)), list(app.dependencies), pip.LOCK, dict(APP_SCRIPTS)
            )
        except EnvironmentProblem as err:
            raise ConfigError(
                f"{app.pyproject}: [project] dependencies: {err}. Ask for a version the lock admits "
                "(fedfleet's hosts share one set of pins), or make a wheel of it available to pip on "
                "this machine (an index or find-links)"
            ) from err
        refs = {"serverapp": app.serverapp, "clientapp": app.clientapp}
        argv = [str(env / "bin" / "python"), "-c", APP_CHECK, str(unpacked), json.dumps(refs)]
        reply = _check(
            argv, tmp, flower_env(tmp / "flwr-home"),
            f"{app.pyproject}: importing the app's components", f"{app.pyproject}: checking the app's components",
        )  # fmt: skip
    if not reply["ok"]:
        raise ConfigError(
            f"{app.pyproject}: [tool.flwr.app.components] {reply['key']}: {reply['error']}. Imported from "
            "the files the FAB holds (what the hosts get), with the app's dependencies installed: fix the "
            "module or the reference (a file the FAB leaves out, e.g. by .gitignore, cannot be imported)"
        )
    return {
        "app": app.fab_id,
        "version": app.version,
        "path": str(app.dir),
        "given_as": source.where,
        "fab": fab.name,
        "dependencies": [flowerapp.shown(d) for d in app.dependencies],
    }


def _node_config(stack: StackConfig, reads: list[flowerapp.NodeConfigRead], app: flowerapp.FlowerApp) -> None:
    source = stack.flower_app
    assert source is not None
    given = {
        p: set(NODE_KEYS) | set(config) for p, config in source.node_config_for(stack.participants).items()
    }
    for read, lacking in flowerapp.missing_node_config(reads, given):
        raise ConfigError(
            f"{app.dir / read.file}:{read.line} reads context.node_config[{read.key!r}], which no "
            f"SuperNode of {', '.join(lacking)} would have: set it in {stack.path} under "
            f"{PROJECT}:app.nodeConfig (every participant) or {PROJECT}:participants[i].nodeConfig "
            f"(one), or read it with .get({read.key!r}, default) in the app. fedfleet sets "
            f"{', '.join(NODE_KEYS)}"
        )


def _local_sites(stack: StackConfig, project_dir: Path, reads: list[flowerapp.NodeConfigRead]) -> None:
    """The local stack's sites: the demo partitions written (if the stack has them), and each
    site's directory there if the app reads data-path (an app may read none: Flower's examples
    partition a dataset by partition-id)."""
    if not stack.is_local:
        return
    paths = _sites(stack, project_dir, stack.app.test_fraction)
    if not any(r.key == "data-path" for r in reads):
        return
    for index, (name, path) in enumerate(paths.items()):
        if not path.is_dir():
            raise DataError(
                f"participant {name!r} ({stack.path}: {PROJECT}:participants[{index}].dataPath "
                f"= {path}) is not a directory, and the app reads node config data-path: create it, "
                "or point dataPath at the site's data"
            )
