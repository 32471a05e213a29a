"""Bad input through the real CLI: a clear error, the right exit status, nothing started or lost."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.sandbox import local_config

from .conftest import running_processes_mentioning
from .test_data import write_images

CLASSES = ["covid", "normal", "pneumonia"]


def fedfleet(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def earlier_run(project: Path) -> tuple[Path, bytes]:
    """A finished run's directory that a failing run must leave as it is."""
    run = project / "runs" / "20260101-000000-aaaa"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"run_id": run.name, "status": "completed"}))
    return run, (run / "summary.json").read_bytes()


def own_data_config(tmp_path: Path, corrupt: bool = False, drop_class: bool = False) -> dict:
    config = local_config()
    del config["fedfleet:data"]["demo"]
    config["fedfleet:app"].update({"classes": CLASSES, "image-size": 16})
    for i, participant in enumerate(config["fedfleet:participants"]):
        root = tmp_path / "sites" / participant["name"]
        classes = CLASSES[:-1] if (drop_class and i == 1) else CLASSES
        write_images(root / "train", dict.fromkeys(classes, 2))
        write_images(root / "test", dict.fromkeys(CLASSES, 1))
        participant["dataPath"] = str(root)
    if corrupt:
        bad = tmp_path / "sites" / "hospital-eu" / "train" / "normal" / "scan-17.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return config


def assert_nothing_left(project: Path, before: tuple[Path, bytes]) -> None:
    assert running_processes_mentioning(str(project)) == []
    run, content = before
    assert (run / "summary.json").read_bytes() == content
    assert sorted(p.name for p in (project / "runs").iterdir()) == [run.name]


def test_missing_stack_file(make_project):
    project = make_project()
    result = fedfleet(project, "run", "--stack", "prod")
    assert result.returncode == 2
    assert "Pulumi.prod.yaml: no such stack file. Stacks here: local" in result.stderr


def test_unknown_strategy(make_project):
    config = local_config()
    config["fedfleet:app"]["strategy"] = "fedsgd"
    project = make_project(config)
    before = earlier_run(project)
    result = fedfleet(project, "run")
    assert result.returncode == 2
    assert "fedfleet:app.strategy: must be one of fedavg, fedprox" in result.stderr
    assert_nothing_left(project, before)


@pytest.mark.parametrize("command", ["run", "configure"])
@pytest.mark.parametrize("key", ["port", "internalPort"])  # the proxy's, the SuperLink's own
def test_port_in_use_names_the_key(make_project, key: str, command: str):
    config = local_config()
    project = make_project(config)
    before = earlier_run(project)
    taken = config["fedfleet:aggregator"][key]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        result = fedfleet(project, command)
    assert result.returncode == 4
    assert f"port 127.0.0.1:{taken}" in result.stderr
    assert f"fedfleet:aggregator.{key}) is already in use" in result.stderr
    assert_nothing_left(project, before)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"corrupt": True}, r"participant 'hospital-eu' .*scan-17\.png is not a readable image"),
        ({"drop_class": True}, r"participant 'hospital-asia' .*missing class folder\(s\) pneumonia"),
    ],
)
def test_bad_site_data_names_participant_and_file(make_project, tmp_path: Path, kwargs, expected):
    project = make_project(own_data_config(tmp_path, **kwargs))
    before = earlier_run(project)
    result = fedfleet(project, "run")
    assert result.returncode == 3, result.stderr
    assert re.search(expected, " ".join(result.stderr.split())), result.stderr
    assert_nothing_left(project, before)


def test_missing_and_empty_data_directory(make_project, tmp_path: Path):
    config = own_data_config(tmp_path)
    config["fedfleet:participants"][0]["dataPath"] = str(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    config["fedfleet:participants"][2]["dataPath"] = str(empty)
    project = make_project(config)
    result = fedfleet(project, "run")
    assert result.returncode == 3
    message = " ".join(result.stderr.split())
    assert "participant 'hospital-us'" in message and "does not exist" in message
    assert "participants[0].dataPath" in message
    config["fedfleet:participants"][0]["dataPath"] = config["fedfleet:participants"][1]["dataPath"]
    project = make_project(config)
    result = fedfleet(project, "run")
    assert result.returncode == 3
    assert "participant 'hospital-eu'" in result.stderr and "is empty" in result.stderr


def test_npz_with_wrong_labels(make_project, tmp_path: Path):
    config = own_data_config(tmp_path)
    site = tmp_path / "npz-site"
    site.mkdir()
    x = np.zeros((4, 16, 16), dtype=np.uint8)
    np.savez(site / "train.npz", x=x, y=np.array([0, 1, 2, 3]))
    np.savez(site / "test.npz", x=x, y=np.array([0, 1, 2, 0]))
    config["fedfleet:participants"][1]["dataPath"] = str(site)
    result = fedfleet(make_project(config), "run")
    assert result.returncode == 3
    assert "labels range over 0..3 but there are 3 classes" in result.stderr


def test_a_cloud_stack_that_is_not_up_says_how_to_create_it(make_project):
    config = local_config()
    config["fedfleet:aggregator"] = {"cloud": "aws", "region": "us-east-1", "instanceType": "m6i.xlarge"}
    del config["fedfleet:local"]
    del config["fedfleet:data"]
    config["fedfleet:app"]["classes"] = ["a", "b"]
    for participant in config["fedfleet:participants"]:
        participant.update(cloud="aws", region="us-east-1")
        del participant["location"]
        for vm in participant["vms"]:
            del vm["port"]
    project = make_project(config)
    result = fedfleet(project, "run")
    assert result.returncode == 2, result.stderr
    assert "has no inventory yet" in result.stderr and "fedfleet up --stack local" in result.stderr
    assert not (project / "runs").exists()


def test_demo_data_is_for_the_local_stack_only(make_project):
    config = local_config()
    del config["fedfleet:local"]
    for participant in config["fedfleet:participants"]:
        participant.update(cloud="aws", region="us-east-1")
        for vm in participant["vms"]:
            del vm["port"]
    result = fedfleet(make_project(config), "run")
    assert result.returncode == 2
    assert "fedfleet:data.demo: writes the demo partitions on this machine" in result.stderr
    assert "fedfleet never copies training data" in result.stderr
