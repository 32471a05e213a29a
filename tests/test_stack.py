"""Stack files: the shipped ones load; bad ones fail naming file, key and fix."""

from __future__ import annotations

import copy

import pytest
from ruamel.yaml import YAML

from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import available_stacks, load_stack
from fedfleet.sandbox import REPO, local_config


def test_shipped_local_stack_is_valid():
    stack = load_stack(REPO, "local")
    assert stack.is_local
    assert [p.name for p in stack.participants] == ["hospital-us", "hospital-asia", "hospital-eu"]
    assert {p.location.cloud for p in stack.participants} == {"aws", "gcp", "azure"}
    assert all(len(p.vms) >= 2 for p in stack.participants)
    assert stack.app.min_participants == 2  # all but one
    assert stack.demo is not None


def _config() -> dict:
    return local_config()


def _expect(make_project, config: dict, match: str) -> None:
    project = make_project(config)
    with pytest.raises(ConfigError, match=match) as info:
        load_stack(project, "local")
    assert "Pulumi.local.yaml" in str(info.value)


def test_missing_stack_file_lists_the_stacks(make_project):
    project = make_project()
    with pytest.raises(ConfigError, match=r"Pulumi\.prod\.yaml: no such stack file\. Stacks here: local"):
        load_stack(project, "prod")
    assert available_stacks(project) == ["local"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("config: [unclosed", "not valid YAML"),
        ("just a string\n", "expected a Pulumi stack file with a top-level 'config:' mapping"),
        ("config:\n  fedfleet:aggregator: {port: 9443}\n", r"fedfleet:participants: is required but missing"),
        (
            "config:\n  fedfleet:aggregator: {cloud: aws}\n",
            r"aggregator: has cloud but not instanceType, region",
        ),
    ],
)
def test_malformed_stack_files(make_project, raw: str, match: str):
    project = make_project(raw=raw)
    with pytest.raises(ConfigError, match=match):
        load_stack(project, "local")


def test_unknown_top_key_suggests_the_closest(make_project):
    config = _config()
    config["fedfleet:participant"] = config.pop("fedfleet:participants")
    _expect(
        make_project, config, r"fedfleet:participant: unknown key; did you mean 'fedfleet:participants'\?"
    )


def test_other_projects_keys_are_left_to_pulumi(make_project):
    config = _config()
    config["aws:region"] = "us-east-1"
    assert load_stack(make_project(config), "local").name == "local"


def test_unknown_strategy_lists_the_choices(make_project):
    config = _config()
    config["fedfleet:app"]["strategy"] = "fedsgd"
    _expect(
        make_project, config, r"fedfleet:app\.strategy: must be one of fedavg, fedprox, .*\(got 'fedsgd'\)"
    )


def test_duplicate_port_names_both_keys(make_project):
    config = _config()
    config["fedfleet:participants"][1]["vms"][0]["port"] = config["fedfleet:aggregator"]["port"]
    _expect(
        make_project,
        config,
        r"fedfleet:participants\[1\]\.vms\[0\]\.port: port \d+ is already used by fedfleet:aggregator\.port",
    )


def test_duplicate_vm_names(make_project):
    config = _config()
    config["fedfleet:participants"][2]["vms"][1]["name"] = config["fedfleet:participants"][0]["vms"][0][
        "name"
    ]
    _expect(make_project, config, r"participants\[2\]\.vms\[1\]\.name: VM name .* is already used by")


def test_a_participant_given_twice_is_named(make_project):
    config = _config()
    config["fedfleet:participants"][2]["name"] = config["fedfleet:participants"][0]["name"]
    _expect(make_project, config, r"participants\[2\]\.name: participant name '[a-z-]+' is used twice")


def test_participant_without_vms(make_project):
    config = _config()
    config["fedfleet:participants"][0]["vms"] = []
    _expect(make_project, config, r"participants\[0\]\.vms: participant 'hospital-us' has no VMs")


def test_vm_key_typo(make_project):
    config = _config()
    config["fedfleet:participants"][0]["vms"][0]["memoryGB"] = 4
    _expect(make_project, config, r"vms\[0\]\.memoryGB: unknown key; did you mean 'memoryGib'\?")


def test_bad_types_and_ranges(make_project):
    config = _config()
    config["fedfleet:participants"][0]["vms"][0]["vcpu"] = "two"
    _expect(make_project, config, r"vms\[0\]\.vcpu: must be a whole number in 1\.\.512 \(got 'two'\)")
    config = _config()
    config["fedfleet:aggregator"]["port"] = 80
    _expect(make_project, config, r"fedfleet:aggregator\.port: must be a whole number in 1024\.\.65535")


def test_own_data_needs_classes(make_project):
    config = _config()
    del config["fedfleet:data"]["demo"]
    _expect(make_project, config, r"fedfleet:app\.classes: is required with your own data")
    config["fedfleet:app"]["classes"] = ["Covid", "Normal", "Viral Pneumonia"]
    config["fedfleet:app"]["image-size"] = 64
    stack = load_stack(make_project(config), "local")
    assert stack.demo is None and stack.app.classes == ("Covid", "Normal", "Viral Pneumonia")


def test_demo_fixes_the_image_shape(make_project):
    config = _config()
    config["fedfleet:app"]["image-size"] = 32
    _expect(make_project, config, r"fedfleet:app\.image-size: is fixed by the demo dataset")


def test_local_stack_listens_on_loopback_only(make_project):
    config = _config()
    config["fedfleet:local"]["host"] = "0.0.0.0"
    _expect(make_project, config, r"fedfleet:local\.host: 0\.0\.0\.0 is not a loopback address")


def test_min_participants_cannot_exceed_participants(make_project):
    config = _config()
    config["fedfleet:app"]["min-participants"] = 4
    _expect(make_project, config, r"min-participants: is 4 but the stack has 3 participants")


def test_participant_location_is_region_or_coordinates(make_project):
    config = _config()
    config["fedfleet:participants"][0]["location"] = {"lat": 37.5, "lon": 127.0}
    stack = load_stack(make_project(config), "local")
    assert stack.participants[0].location.lat == 37.5
    config = copy.deepcopy(config)
    config["fedfleet:participants"][0]["location"] = {"lat": 37.5, "region": "x"}
    _expect(
        make_project, config, r"participants\[0\]\.location: give either \{cloud, region\} or \{lat, lon\}"
    )


def _shipped(name: str) -> dict:
    return dict(YAML(typ="safe").load((REPO / "stacks" / f"Pulumi.{name}.yaml").read_text())["config"])


def test_bastion_is_only_for_sites_fedfleet_creates(make_project):
    config = _shipped("onprem")
    config["fedfleet:participants"][1]["bastion"] = True
    project = make_project(config, stack="onprem")
    with pytest.raises(
        ConfigError,
        match=r"Pulumi\.onprem\.yaml: fedfleet:participants\[1\]\.bastion: is the SSH gateway `fedfleet up` "
        r"creates in a cloud site; this participant's VMs are given by address.*ssh\.jumpHost",
    ):
        load_stack(project, "onprem")
    config = _config()
    config["fedfleet:participants"][0]["bastion"] = False
    _expect(make_project, config, r"fedfleet:participants\[0\]\.bastion: the local stack emulates its hosts")


def test_bastion_is_on_by_default_for_cloud_sites(make_project):
    config = _shipped("dev")
    assert all(p.bastion for p in load_stack(make_project(config, stack="dev"), "dev").participants)
    config["fedfleet:participants"][1]["bastion"] = False
    stack = load_stack(make_project(config, stack="dev"), "dev")
    assert [p.bastion for p in stack.participants] == [True, False]
    config["fedfleet:participants"][1]["bastion"] = "no"
    with pytest.raises(ConfigError, match=r"participants\[1\]\.bastion: must be true or false \(got 'no'\)"):
        load_stack(make_project(config, stack="dev"), "dev")


def test_robust_aggregation_and_privacy_settings_are_checked_in_the_stack_file(make_project):
    config = _config()
    config["fedfleet:app"] = {
        **config.get("fedfleet:app", {}),
        "dp": "server-fixed",
        "dp-noise-multiplier": 500,
    }
    _expect(make_project, config, r"fedfleet:app\.dp-noise-multiplier: must be in 0\.\.100")
    config["fedfleet:app"] = {**config["fedfleet:app"], "dp-noise-multiplier": 0.8, "strategy": "bulyan"}
    _expect(make_project, config, r"fedfleet:app\.min-participants: must be at least 3 for bulyan")
    config["fedfleet:app"] = {**config["fedfleet:app"], "min-participants": 3}
    stack = load_stack(make_project(config), "local")
    assert (stack.app.dp, stack.app.dp_noise_multiplier, stack.app.strategy) == (
        "server-fixed",
        0.8,
        "bulyan",
    )


def test_the_superlinks_own_port_behind_the_proxy_is_checked(make_project):
    config = _config()
    port = config["fedfleet:aggregator"]["port"]
    config["fedfleet:aggregator"]["internalPort"] = port
    _expect(make_project, config, r"fedfleet:aggregator\.internalPort: is the aggregator's port")
    vm_port = config["fedfleet:participants"][0]["vms"][0]["port"]
    config["fedfleet:aggregator"]["internalPort"] = vm_port
    _expect(make_project, config, r"port \d+ is already used by fedfleet:aggregator\.internalPort")
    del config["fedfleet:aggregator"]["internalPort"]
    assert load_stack(make_project(config), "local").aggregator.internal_port == port + 1
