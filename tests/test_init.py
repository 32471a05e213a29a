"""`fedfleet init`: the stack file it writes loads like any other, for each kind; bad
answers are named and nothing is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfleet.core.stack import load_stack
from fedfleet.sandbox import scratch_project

from .infra_harness import SSH_KEY
from .test_cli_errors import fedfleet

SITES = ["--participant", "hospital-us@aws:us-east-1", "--participant", "hospital-eu@52.37,4.90"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return scratch_project(tmp_path / "p")


def test_a_local_stack_with_your_own_model(project: Path):
    (project / "models").mkdir()
    (project / "models" / "net.py").write_text("def build(num_classes, channels, image_size): ...\n")
    done = fedfleet(project, "init", "mine", *SITES, "--vms", "3", "--model", "models/net.py:build")
    assert done.returncode == 0, done.stderr
    assert "fedfleet run --stack mine" in done.stdout
    stack = load_stack(project, "mine")
    assert stack.is_local and [p.name for p in stack.participants] == ["hospital-us", "hospital-eu"]
    assert [vm.name for vm in stack.participants[0].vms] == ["us-vm-1", "us-vm-2", "us-vm-3"]
    ports = [stack.aggregator.port, *(vm.port for p in stack.participants for vm in p.vms)]
    assert len(set(ports)) == 7
    assert stack.model is not None and stack.model.file == project / "models" / "net.py"
    assert stack.app.model == "fedfleet_models.net:build" and stack.demo is not None
    text = (project / "stacks" / "Pulumi.mine.yaml").read_text()
    assert "# " in text and "fedfleet run --stack mine" in text  # a file to read, not just data


def test_a_stack_of_your_own_machines(project: Path):
    done = fedfleet(
        project, "init", "onsite", "--kind", "hosts", *SITES, "--vm", "hospital-us=10.1.0.5",
        "--vm", "hospital-us=10.1.0.6", "--vm", "hospital-eu=192.0.2.20", "--aggregator", "203.0.113.10",
        "--classes", "covid,normal", "--data-path", "/srv/xray", "--image-size", "128",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stack = load_stack(project, "onsite")
    assert stack.kind == "hosts" and stack.aggregator.host is not None
    assert stack.aggregator.host.address == "203.0.113.10"
    us = stack.participants[0]
    assert [vm.host.address for vm in us.vms if vm.host] == ["10.1.0.5", "10.1.0.6"]
    assert us.data_path == "/srv/xray" and stack.app.classes == ("covid", "normal")
    assert stack.app.image_size == 128


def test_a_stack_of_your_own_machines_running_your_own_flower_app(project: Path):
    app = Path(__file__).parent / "fixtures" / "numpy-app"
    done = fedfleet(
        project, "init", "mine", "--kind", "hosts", *SITES, "--vm", "hospital-us=10.1.0.5",
        "--vm", "hospital-eu=192.0.2.20", "--aggregator", "203.0.113.10", "--app", str(app), "--rounds", "4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stack = load_stack(project, "mine")
    assert stack.flower_app is not None and stack.flower_app.app.dir == app
    assert stack.flower_app.overrides == {"num-server-rounds": 4} and stack.model is None


def test_a_cloud_stack(project: Path, tmp_path: Path):
    key = tmp_path / "op.pub"
    key.write_text(SSH_KEY + "\n")
    done = fedfleet(
        project, "init", "prod2", "--kind", "cloud", "--participant", "hospital-us@aws:us-east-1",
        "--participant", "hospital-eu@azure:westeurope", "--classes", "a,b", "--operator-key", str(key),
        "--operator-cidr", "203.0.113.7/32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stack = load_stack(project, "prod2")
    assert stack.kind == "cloud" and [p.cloud for p in stack.participants] == ["aws", "azure"]
    assert "fedfleet plan --stack prod2" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--participant", "hospital-us@aws:us-east-1"], "at least two participants"),
        ([*SITES[:2], "--participant", "hospital-eu@somewhere"], "must be cloud:region"),
        ([*SITES, "--kind", "hosts", "--aggregator", "203.0.113.10"], "has no machines: give --vm"),
        ([*SITES, "--kind", "cloud", "--classes", "a,b"], "needs --operator-key"),
        ([*SITES, "--classes", "a,b"], "give --data-path DIR"),
        ([*SITES, "--model", "models/none.py:build"], r"fedfleet:app.model: .*none.py does not exist"),
        (["--participant", "X@aws:us-east-1", *SITES], r"participants\[0\].name: 'X' must be"),
        (
            [*SITES, "--participant", "hospital-us@aws:us-west-2"],
            r"participants\[2\]\.name: participant name 'hospital-us' is used twice",
        ),
        ([*SITES, "--app", "nowhere"], r"--app: .*nowhere is not a directory"),
        (
            [*SITES, "--app", str(Path(__file__).parent / "fixtures" / "numpy-app"), "--model", "m.py:f"],
            r"give --app .* or --model .*, not both",
        ),
    ],
)
def test_bad_answers_are_named_and_nothing_is_written(project: Path, args: list[str], message: str):
    done = fedfleet(project, "init", "bad", *args)
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert not (project / "stacks" / "Pulumi.bad.yaml").exists()


def test_an_existing_stack_is_kept_unless_forced(project: Path):
    before = (project / "stacks" / "Pulumi.local.yaml").read_text()
    done = fedfleet(project, "init", "local", *SITES)
    assert done.returncode == 2 and "exists" in done.stderr and "--force" in done.stderr
    assert (project / "stacks" / "Pulumi.local.yaml").read_text() == before
    forced = fedfleet(project, "init", "local", *SITES, "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_stack(project, "local").participants[1].name == "hospital-eu"
