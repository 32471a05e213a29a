"""`fedfleet plan` through the real CLI: table/JSON, plot, the stack file written only on success."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import load_stack, stack_yaml
from fedfleet.sandbox import REPO, local_config
from fedfleet.stages.plan import parse_weights


def fedfleet(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "plan", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def shipped_local_with_ports(make_project) -> Path:
    """The shipped local stack file, comments and all, in a scratch project."""
    project = make_project()
    (project / "stacks" / "Pulumi.local.yaml").write_text((REPO / "stacks" / "Pulumi.local.yaml").read_text())
    return project


def test_plan_writes_only_the_aggregator_keys_and_keeps_comments(make_project):
    project = shipped_local_with_ports(make_project)
    stack_file = project / "stacks" / "Pulumi.local.yaml"
    before = stack_file.read_text()
    result = fedfleet(project, "--json", "--weights", "cost=0.9,latency=0.1")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    chosen = data["chosen"]
    after = stack_file.read_text()
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert sorted(line.strip() for line in added) == sorted(
        [
            f"cloud: {chosen['cloud']}",
            f"region: {chosen['region']}",
            f"instanceType: {chosen['instance_type']}",
        ]
    )
    assert all(line in after.splitlines() for line in before.splitlines())  # nothing removed, comments kept
    stack = load_stack(project, "local")
    assert (stack.aggregator.cloud, stack.aggregator.region, stack.aggregator.instance_type) == (
        chosen["cloud"], chosen["region"], chosen["instance_type"],
    )  # fmt: skip
    assert Path(data["plot"]).stat().st_size > 10_000  # a PNG was drawn
    assert data["written_to_stack"] is True
    # The same plan again changes nothing.
    assert json.loads(fedfleet(project, "--json", "--weights", "9:1").stdout)["written_to_stack"] is False


def test_verify_reports_the_share_of_the_exact_front(make_project):
    project = make_project()
    data = json.loads(fedfleet(project, "--json", "--verify", "--dry-run").stdout)
    v = data["verification"]
    assert v["share_of_exact_front_found"] >= 0.99 and v["hypervolume_ratio"] >= 0.99
    assert data["optimizer"]["evaluations"] > 0
    assert {p["name"] for p in data["chosen"]["participants"]} == {
        "hospital-us",
        "hospital-asia",
        "hospital-eu",
    }
    assert all(p["rtt_source"] for p in data["chosen"]["participants"])


def test_infeasible_limits_write_nothing(make_project):
    project = shipped_local_with_ports(make_project)
    stack_file = project / "stacks" / "Pulumi.local.yaml"
    before = stack_file.read_text()
    result = fedfleet(project, "--max-latency", "40")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "max latency 40 ms binds" in message and "Fastest relaxation: raise max latency to" in message
    assert stack_file.read_text() == before


def test_flags_override_the_stack_limits(make_project):
    project = make_project()
    data = json.loads(
        fedfleet(
            project, "--json", "--dry-run", "--regions", "gcp:europe-west1,aws:eu-west-1", "--min-vcpu", "4"
        ).stdout
    )
    assert {f["label"].rsplit(":", 1)[0] for f in data["front"]} <= {"gcp:europe-west1", "aws:eu-west-1"}
    assert data["chosen"]["vcpu"] >= 4
    result = fedfleet(project, "--regions", "gcp:europe-wets1")
    assert result.returncode == 2 and "closest: gcp:europe-west1" in result.stderr


def test_unknown_participant_region_lists_the_closest(make_project):
    config = local_config()
    config["fedfleet:participants"][1]["location"] = {"cloud": "gcp", "region": "asia-northeast9"}
    result = fedfleet(make_project(config))
    assert result.returncode == 2
    assert (
        "participants[1].location.region: 'asia-northeast9' is not a gcp region in the catalog (closest: asia-northeast"
        in " ".join(result.stderr.split())
    )


def test_malformed_catalog_override_names_file_and_row(make_project, tmp_path: Path):
    override = tmp_path / "prices.csv"
    override.write_text(
        "cloud,region,instance_type,vcpu,memory_gib,usd_per_hour\naws,us-east-1,t3.medium,2,4,cheap\n"
    )
    config = local_config()
    config["fedfleet:placement"]["catalogOverrides"] = [str(override)]
    result = fedfleet(make_project(config))
    assert result.returncode == 2
    assert f"{override} row 2, column usd_per_hour: 'cheap' is not a number" in " ".join(
        result.stderr.split()
    )


def test_private_data_centre_participants(make_project):
    config = local_config()
    config["fedfleet:participants"][0]["location"] = {"lat": 37.39, "lon": -122.08}
    data = json.loads(fedfleet(make_project(config), "--json", "--dry-run").stdout)
    first = data["chosen"]["participants"][0]
    assert first["rtt_estimated"] is True and "great-circle" in first["rtt_source"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cost=0.9,latency=0.1", (0.9, 0.1)), ("1:9", (1.0, 9.0)), ("latency=1", (0.0, 1.0))],
)
def test_weights_parse(text, expected):
    assert parse_weights(text) == expected


@pytest.mark.parametrize("text", ["cost=a", "speed=1,cost=1", "0,0", "1,2,3"])
def test_bad_weights(text):
    with pytest.raises(ConfigError, match="--weights"):
        parse_weights(text)


def test_placement_section_is_validated(make_project):
    config = local_config()
    config["fedfleet:placement"]["weights"] = {"cost": 0, "latency": 0}
    with pytest.raises(ConfigError, match="weights: cost and latency weights cannot both be 0"):
        load_stack(make_project(config), "local")
    config = local_config()
    config["fedfleet:placement"]["maxLatency"] = 200
    with pytest.raises(ConfigError, match=r"placement\.maxLatency: unknown key; did you mean 'maxLatencyMs'"):
        load_stack(make_project(config), "local")
    config = local_config()
    config["fedfleet:placement"]["clouds"] = ["aws", "ibm"]
    with pytest.raises(ConfigError, match=r"clouds\[1\]: must be one of aws, gcp, azure"):
        load_stack(make_project(config), "local")


def test_yaml_round_trip_is_stable_for_every_shipped_stack(tmp_path: Path):
    """The writer's YAML settings reproduce the shipped files byte for byte when nothing changes."""
    yaml = stack_yaml()
    for path in (REPO / "stacks").glob("Pulumi.*.yaml"):
        out = tmp_path / path.name
        with out.open("w") as fh:
            yaml.dump(yaml.load(path.read_text()), fh)
        assert out.read_text() == path.read_text(), path.name


def test_plan_keeps_an_aggregator_given_by_address(make_project):
    """A hosts stack's aggregator is a machine: the plan is shown, the stack file untouched."""
    project = make_project()
    stack_file = project / "stacks" / "Pulumi.onprem.yaml"
    stack_file.write_text((REPO / "stacks" / "Pulumi.onprem.yaml").read_text())
    before = stack_file.read_text()
    result = fedfleet(project, "--stack", "onprem")
    assert result.returncode == 0, result.stderr
    assert "fedfleet:aggregator has an address" in result.stdout
    assert stack_file.read_text() == before
