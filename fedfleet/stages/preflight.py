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
from pathlib import Path

from fedfleet_app import data as app_data
from fedfleet_app.settings import AppSettings

from fedfleet.adapters import pip
from fedfleet.adapters.flwr import APP_SCRIPTS, flower_env
from fedfleet.core import flowerapp
from fedfleet.core.errors import ConfigError, DataError, EnvironmentProblem
from fedfleet.core.paths import StackPaths, data_path
from fedfleet.core.stack import NODE_KEYS, PROJECT, StackConfig
from fedfleet.hosts.base import Host


def data(stack: StackConfig, project_dir: Path, settings: AppSettings) -> dict[str, dict[str, int]]:
    """Per local participant, its train and test examples (empty for a stack of real hosts)."""
    if not stack.is_local:
        return {}
    paths = {p.name: data_path(stack, project_dir, p.name) for p in stack.participants}
    if stack.demo is not None:
        app_data.write_demo(
            list(paths.values()),
            iid=stack.demo.partition == "iid",
            alpha=stack.demo.alpha,
            seed=stack.demo.seed,
            test_fraction=settings.test_fraction,
        )
    if stack.flower_app is not None:  # it reads its data its own way: the directory must exist
        for index, (name, path) in enumerate(paths.items()):
            if not path.is_dir():
                raise DataError(
                    f"participant {name!r} ({stack.path}: {PROJECT}:participants[{index}].dataPath "
                    f"= {path}) is not a directory: the SuperNode passes it to the app as node config "
                    "data-path; create it, or point dataPath at the site's data"
                )
        return {}
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


def superlink_port(stack: StackConfig, aggregator: Host, address: str) -> None:
    """The local SuperLink's port is free, or held by the aggregator's own running service.

    (A participant VM's port is checked by the SuperNode role's preflight: a VM whose port
    is taken fails to start and the participant's next VM takes over.)"""
    if not stack.is_local or aggregator.status().reachable:
        return  # real hosts: the role checks; local: its services run (a `fedfleet configure` before)
    port = stack.aggregator.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers do: connections in TIME_WAIT from a run that just ended
        # must not count, a socket still listening must.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            raise EnvironmentProblem(
                f"port {address}:{port} ({stack.path}: {PROJECT}:aggregator.port) is already in use "
                f"({err.strerror}). Stop whatever listens there (`ss -ltnp 'sport = :{port}'` "
                "shows it) or change that key to a free port"
            ) from err


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
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"{stack.path}: {PROJECT}:app.model: building {source.setting} took over 300 s"
        ) from None
    lines = done.stdout.strip().splitlines()
    reply = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if reply is None:
        raise ConfigError(
            f"{stack.path}: {PROJECT}:app.model: checking {source.setting} failed: "
            + (done.stderr.strip().splitlines() or ["no output"])[-1]
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


def flower_app(stack: StackConfig, paths: StackPaths) -> dict[str, object]:
    """A Flower app of your own, checked before any host is touched: every node-config key
    its code reads without a default is set for every participant; its dependencies install
    (into its own environment on this machine, which the local stack's hosts run it in);
    its ServerApp and ClientApp import there and are what Flower runs. What it is, for the
    run's summary."""
    source = stack.flower_app
    assert source is not None
    app = source.app
    given = {
        p: set(NODE_KEYS) | set(config) for p, config in source.node_config_for(stack.participants).items()
    }
    for read, lacking in flowerapp.missing_node_config(app, given):
        raise ConfigError(
            f"{read.file}:{read.line} reads context.node_config[{read.key!r}], which no SuperNode of "
            f"{', '.join(lacking)} would have: set it in {stack.path} under {PROJECT}:app.nodeConfig "
            f"(every participant) or {PROJECT}:participants[i].nodeConfig (one), or read it with "
            f".get({read.key!r}, default) in the app. fedfleet sets {', '.join(NODE_KEYS)}"
        )
    try:
        env = pip.app_env(
            paths.app_env(flowerapp.env_key(app)), list(app.dependencies), pip.LOCK, dict(APP_SCRIPTS)
        )
    except EnvironmentProblem as err:
        raise ConfigError(
            f"{app.pyproject}: [project] dependencies: {err}. Fix the requirement, or make the "
            "package available to pip on this machine (an index or find-links)"
        ) from err
    refs = {"serverapp": app.serverapp, "clientapp": app.clientapp}
    argv = [str(env / "bin" / "python"), "-c", APP_CHECK, str(app.dir), json.dumps(refs)]
    with tempfile.TemporaryDirectory(prefix="fedfleet-appcheck-") as scratch:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=300, check=False, cwd=scratch,
                env=flower_env(Path(scratch) / "flwr-home"),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{app.pyproject}: importing the app's components took over 300 s") from None
    lines = done.stdout.strip().splitlines()
    reply = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if reply is None:
        raise ConfigError(
            f"{app.pyproject}: checking the app's components failed: "
            + (done.stderr.strip().splitlines() or ["no output"])[-1]
        )
    if not reply["ok"]:
        raise ConfigError(
            f"{app.pyproject}: [tool.flwr.app.components] {reply['key']}: {reply['error']}. The app's "
            f"directory is on the path ({app.dir}) and its dependencies are installed: fix the module or "
            "the reference"
        )
    return {
        "app": app.fab_id,
        "version": app.version,
        "path": str(app.dir),
        "given_as": source.where,
        "dependencies": list(app.dependencies),
    }
