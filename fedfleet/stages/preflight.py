"""Preflight: what the controller checks before anything starts.

The participants' data: on the local stack fedfleet writes the demo partitions when the stack asks for them,
then loads every site's data as its ClientApp will, so a bad file is named before any
process starts. On real hosts the data is the site's own and stays there: the
SuperNode role checks that its path exists on the VM, and the examples each site
trained on are reported by the rounds.

The SuperLink's port on the local stack (on real hosts the SuperLink role checks it).
"""

from __future__ import annotations

import socket
from pathlib import Path

from fedfleet_app import data as app_data
from fedfleet_app.settings import AppSettings

from fedfleet.core.errors import DataError, EnvironmentProblem
from fedfleet.core.paths import data_path
from fedfleet.core.stack import PROJECT, StackConfig
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
