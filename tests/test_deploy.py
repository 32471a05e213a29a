"""Provisioning commands, promotion and CI workflow files (no Pulumi CLI here, said clearly)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from fedfleet.core.stack import Operator, load_stack
from fedfleet.sandbox import REPO, scratch_project
from fedfleet.stages.promote import plan_promotion
from infra.common import cloud_init

from .infra_harness import SSH_KEY


def fedfleet(
    project: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), *args],
        capture_output=True, text=True, timeout=120, check=False, input=stdin, env=env,
    )  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch project with the shipped dev and prod stack files, comments and all."""
    p = scratch_project(tmp_path / "project")
    for name in ("dev", "prod"):
        (p / "stacks" / f"Pulumi.{name}.yaml").write_text(
            (REPO / "stacks" / f"Pulumi.{name}.yaml").read_text()
        )
    (p / "infra").symlink_to(REPO / "infra")
    return p


def test_cloud_commands_start_nothing_without_a_verified_credential(project: Path, tmp_path: Path):
    # (tests/test_auth.py: with verified credentials, the missing Pulumi CLI is named next)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "ARM_", "FEDFLEET_"))}
    env["FEDFLEET_CREDENTIALS_DIR"] = str(tmp_path / "empty-store")
    for command in ("preview", "up", "destroy"):
        result = fedfleet(
            project, command, "--stack", "dev", *(["--yes"] if command == "destroy" else []), env=env
        )
        assert result.returncode == 7, result.stderr
        message = " ".join(result.stderr.split())
        assert "aws: the stack uses aws, and no credential for it is stored" in message
        assert "`fedfleet auth add aws --file FILE`" in message


def test_config_errors_come_before_the_missing_cli(project: Path):
    path = project / "stacks" / "Pulumi.dev.yaml"
    path.write_text(path.read_text().replace("cidr: 10.21.0.0/16", "cidr: 10.20.0.0/17"))
    result = fedfleet(project, "up", "--stack", "dev")
    assert result.returncode == 2
    assert "participants[1].cidr: 10.20.0.0/17 overlaps fedfleet:participants[0].cidr" in result.stderr


def test_local_stack_up_outputs_and_destroy(make_project):
    project = make_project()
    up = fedfleet(project, "up", "--stack", "local", "--json")
    assert up.returncode == 0, up.stderr
    inventory = json.loads(up.stdout)
    homes = [vm["home"] for vms in inventory["participants"].values() for vm in vms]
    # Each VM's disk exists; its node key is made by the Ansible role on the VM, not here.
    assert len(homes) == 6 and all(Path(h).is_dir() for h in homes)
    assert json.loads(fedfleet(project, "outputs", "--json").stdout) == inventory
    assert fedfleet(project, "destroy", "--stack", "local", "--yes").returncode == 0
    assert not (project / ".fedfleet" / "local").exists()
    gone = fedfleet(project, "outputs")
    assert gone.returncode == 4 and "is not up" in gone.stderr


def test_promote_copies_training_and_keeps_the_environment(project: Path):
    dev = project / "stacks" / "Pulumi.dev.yaml"
    yaml = YAML()
    data = yaml.load(dev.read_text())
    data["config"]["fedfleet:app"]["strategy"] = "fedprox"
    data["config"]["fedfleet:app"]["strategy-options"] = {"proximal_mu": 0.1}
    data["config"]["fedfleet:placement"]["weights"] = {"cost": 0.9, "latency": 0.1}
    with dev.open("w") as fh:
        yaml.dump(data, fh)
    prod_before = load_stack(project, "prod")
    prod_text = (project / "stacks" / "Pulumi.prod.yaml").read_text()

    refused = fedfleet(project, "promote", "--from", "dev", "--to", "prod")
    assert refused.returncode == 1 and "pass --yes" in refused.stdout
    assert "+    strategy: fedprox" in refused.stdout  # the diff is shown first
    assert (project / "stacks" / "Pulumi.prod.yaml").read_text() == prod_text

    done = fedfleet(project, "promote", "--from", "dev", "--to", "prod", "--yes")
    assert done.returncode == 0, done.stderr
    prod = load_stack(project, "prod")
    assert prod.app.strategy == "fedprox" and prod.app.strategy_options == {"proximal_mu": 0.1}
    assert (prod.placement.cost_weight, prod.placement.latency_weight) == pytest.approx((0.9, 0.1))
    # The environment stays: sites, clouds, budget in KRW, operator, aggregator, provider keys.
    assert prod.participants == prod_before.participants and prod.operator == prod_before.operator
    assert prod.aggregator == prod_before.aggregator
    assert (prod.placement.max_cost, prod.placement.currency) == (
        prod_before.placement.max_cost,
        prod_before.placement.currency,
    )
    text = (project / "stacks" / "Pulumi.prod.yaml").read_text()
    assert "gcp:project: fedfleet-prod-example" in text and "# The seed's limits" in text  # comments kept
    assert plan_promotion(project, "dev", "prod").changed is False


def test_promotion_that_would_break_the_target_writes_nothing(project: Path):
    # dev asks every one of its three participants in every round; prod (whose participants
    # are its own: they are not promoted) has two, so the promoted prod would be invalid.
    yaml = YAML()
    dev = project / "stacks" / "Pulumi.dev.yaml"
    data = yaml.load(dev.read_text())
    third = copy.deepcopy(data["config"]["fedfleet:participants"][1])
    third.update(name="hospital-c", cidr="10.22.0.0/16")
    third["vms"][0]["name"] = "c-vm-1"
    data["config"]["fedfleet:participants"].append(third)
    data["config"]["fedfleet:app"]["min-participants"] = 3
    with dev.open("w") as fh:
        yaml.dump(data, fh)
    prod_path = project / "stacks" / "Pulumi.prod.yaml"
    prod = yaml.load(prod_path.read_text())
    del prod["config"]["fedfleet:participants"][2]
    with prod_path.open("w") as fh:
        yaml.dump(prod, fh)
    before = prod_path.read_text()
    result = fedfleet(project, "promote", "--from", "dev", "--to", "prod", "--yes")
    assert result.returncode == 2, result.stderr
    assert (
        "Pulumi.prod.yaml: fedfleet:app.min-participants: is 3 but the stack has 2 participants"
        in " ".join(result.stderr.split())
    )
    assert prod_path.read_text() == before


def test_cloud_init_prepares_the_admin_user_and_python():
    text = cloud_init(Operator(SSH_KEY, "198.51.100.7/32", "ops"))
    doc = YAML(typ="safe").load(text)
    assert text.startswith("#cloud-config\n")
    (user,) = doc["users"]
    assert user["name"] == "ops" and user["ssh_authorized_keys"] == [SSH_KEY] and user["lock_passwd"] is True
    assert "python3" in doc["packages"] and doc["ssh_pwauth"] is False


def test_workflows_test_preview_and_deploy_with_an_approval_gate():
    yaml = YAML(typ="safe")
    ci = yaml.load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    deploy_wf = yaml.load((REPO / ".github" / "workflows" / "deploy.yml").read_text())
    assert any(step.get("run") == ".ci/run" for step in ci["jobs"]["test"]["steps"])
    assert ci["jobs"]["preview"]["strategy"]["matrix"]["stack"] == ["dev", "prod"]
    assert any("fedfleet preview" in str(step.get("run", "")) for step in ci["jobs"]["preview"]["steps"])
    assert deploy_wf["jobs"]["prod"]["needs"] == "dev"
    assert deploy_wf["jobs"]["prod"]["environment"] == "production"
    for job in ("dev", "prod"):
        assert any(
            f"fedfleet up --stack {job}" in str(s.get("run", "")) for s in deploy_wf["jobs"][job]["steps"]
        )
