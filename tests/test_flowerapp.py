"""A Flower app of your own (`fedfleet:app.path`, `fedfleet run --app`): read, checked before
any host is touched, staged for `flwr run` without touching the user's copy, given its
dependencies and node config, and followed through the lines Flower itself logs."""

from __future__ import annotations

import logging
import shutil
import time
import tomllib
from pathlib import Path

import pytest
from flwr.server.history import History
from flwr.supercore.logger import ConsoleHandler
from ruamel.yaml import YAML

from fedfleet import workflow
from fedfleet.adapters.flwr import stage_app
from fedfleet.core import flowerapp
from fedfleet.core.errors import ConfigError, DataError
from fedfleet.core.flowerlog import LogReader
from fedfleet.core.paths import stack_paths
from fedfleet.core.records import RunState
from fedfleet.core.stack import StackConfig, flower_app_from, load_stack, set_rounds
from fedfleet.sandbox import REPO, local_config, scratch_project
from fedfleet.stages import configure

from .conftest import Local
from .test_cli_errors import earlier_run, fedfleet

FIXTURE = Path(__file__).parent / "fixtures" / "numpy-app"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A copy of the fixture app the test may change."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "my-app"))


def project_with_app(tmp_path: Path, app: Path, **keys: object) -> Path:
    config = local_config(vms_per_participant=1)
    config["fedfleet:app"] = {"path": str(app), **keys}
    return scratch_project(tmp_path / "p", config)


def edit_pyproject(app: Path, old: str, new: str) -> None:
    path = app / "pyproject.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# -- reading the app --------------------------------------------------------------------


def test_the_fixture_app_is_read_as_flower_reads_it():
    app = flowerapp.load(FIXTURE, "test")
    assert (app.name, app.version, app.publisher, app.fab_id) == (
        "numpy-app", "1.0.0", "fedfleet-tests", "fedfleet-tests/numpy-app",
    )  # fmt: skip
    assert (app.serverapp, app.clientapp) == ("numpy_app.server_app:app", "numpy_app.client_app:app")
    assert app.config == {
        "num-server-rounds": 3, "learning-rate": 0.5, "local-steps": 20, "samples-per-node": 400,
    }  # fmt: skip
    # Flower itself is fedfleet's (1.41.0); the rest is the app's to install.
    assert app.dependencies == ("numpy>=2.0.2", "tabulate>=0.9")
    assert app.flwr_requirement == "flwr[simulation]>=1.20.0"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (("[tool.flwr.app.components]", "[tool.flwr.components]"), r"no \[tool\.flwr\.app\.components\] table"),
        (('publisher = "fedfleet-tests"', ""), r"\[tool\.flwr\.app\] publisher is missing"),
        (('serverapp = "numpy_app.server_app:app"', 'serverapp = "numpy_app"'), r"serverapp = 'numpy_app': must be module:attribute"),
        (('name = "numpy-app"', 'name = "numpy app"'), r"only letters, digits and '-'"),
        (('"flwr[simulation]>=1.20.0"', '"flwr>=2.0"'), r"'flwr>=2\.0' excludes Flower 1\.41\.0"),
        (('"tabulate>=0.9"', '"tabulate>>0.9"'), r"'tabulate>>0\.9' is not a requirement"),
        (("learning-rate = 0.5", "learning-rate = [0.5]"), r"learning-rate: Flower's run config takes"),
        (("[project]", "[project"), r"cannot be read as TOML"),
    ],
)  # fmt: skip
def test_a_bad_pyproject_names_the_key_and_the_fix(app: Path, change: tuple[str, str], match: str):
    edit_pyproject(app, *change)
    with pytest.raises(ConfigError, match=match) as err:
        flowerapp.load(app, "test")
    assert str(app / "pyproject.toml") in str(err.value)


def test_a_directory_without_pyproject_is_named(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no pyproject\.toml: a Flower app is a directory"):
        flowerapp.load(tmp_path / "empty", "--app")
    with pytest.raises(ConfigError, match=r"is not a directory"):
        flowerapp.load(tmp_path / "nothing", "--app")


def test_run_config_overrides_must_be_keys_of_the_app_with_their_type():
    app = flowerapp.load(FIXTURE, "test")
    out = flowerapp.run_config(app, {"learning-rate": 1, "num-server-rounds": 5}, "k")
    assert out["learning-rate"] == 1.0 and isinstance(out["learning-rate"], float)
    assert out["num-server-rounds"] == 5 and out["local-steps"] == 20
    with pytest.raises(
        ConfigError, match=r"k\.learning_rate: .* has no such key \(did you mean 'learning-rate'\?\)"
    ):
        flowerapp.run_config(app, {"learning_rate": 0.1}, "k")
    with pytest.raises(
        ConfigError, match=r"k\.num-server-rounds: 'five' is not a int like the app's default"
    ):
        flowerapp.run_config(app, {"num-server-rounds": "five"}, "k")
    with pytest.raises(ConfigError, match=r"k\.local-steps: True is not a int"):
        flowerapp.run_config(app, {"local-steps": True}, "k")


def test_the_node_config_the_app_reads_is_found_in_its_code(app: Path):
    reads = flowerapp.node_config_reads(app)
    assert {(r.key, r.required) for r in reads} == {
        ("data-path", True), ("partition-id", True), ("num-partitions", True),
    }  # fmt: skip
    (app / "numpy_app" / "extra.py").write_text(
        "def f(context, node_config):\n"
        "    a = context.node_config.get('optional-key', 1)\n"
        "    b = context.node_config['guarded'] if 'guarded' in context.node_config else 0\n"
        "    return node_config['site-secret'], a, b\n"
    )
    (app / "tests").mkdir()
    (app / "tests" / "helper.py").write_text("x = context.node_config['only-in-tests']\n")  # not in the FAB
    missing = flowerapp.missing_node_config(
        flowerapp.node_config_reads(app),
        {"a": {"data-path", "partition-id", "num-partitions"}, "b": {"site-secret", *flowerapp_keys()}},
    )
    found = [(str(m.file), m.key, m.line, lacking) for m, lacking in missing]
    assert ("numpy_app/extra.py", "site-secret", 4, ["a"]) in found
    assert "guarded" not in [key for _, key, _, _ in found]


def flowerapp_keys() -> set[str]:
    return {"data-path", "partition-id", "num-partitions"}


# -- in the stack file ------------------------------------------------------------------


def test_the_stack_names_the_app_its_overrides_and_node_config(tmp_path: Path, app: Path):
    project = project_with_app(tmp_path, app, config={"num-server-rounds": 2}, nodeConfig={"site-tag": "x"})
    stack = load_stack(project, "local")
    source = stack.flower_app
    assert source is not None and source.app.dir == app and stack.model is None
    assert source.overrides == {"num-server-rounds": 2} and stack.app.num_server_rounds == 2
    per_site = source.node_config_for(stack.participants)
    assert per_site["hospital-asia"] == {"partition-id": 1, "num-partitions": 3, "site-tag": "x"}
    assert set_rounds(source, 7).run_config["num-server-rounds"] == 7


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"strategy": "fedavg"}, r"fedfleet:app\.strategy: is a setting of fedfleet's built-in app"),
        ({"config": {"rounds": 2}}, r"fedfleet:app\.config\.rounds: .* has no such key"),
        ({"nodeConfig": {"data-path": "/x"}}, r"fedfleet:app\.nodeConfig\.data-path: is set by fedfleet"),
        (
            {"nodeConfig": {"k": [1]}},
            r"fedfleet:app\.nodeConfig\.k: must be a string, a finite number or a boolean",
        ),
        (
            {"nodeConfig": {"k": float("inf")}},
            r"fedfleet:app\.nodeConfig\.k: must be a string, a finite number",
        ),
        ({"nodeConfig": {"k": 'eu "west"'}}, r"fedfleet:app\.nodeConfig\.k: cannot hold a double quote"),
    ],
)
def test_bad_app_keys_are_named(tmp_path: Path, app: Path, keys: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        load_stack(project_with_app(tmp_path, app, **keys), "local")


def test_an_app_path_that_is_no_app_is_named_with_its_key(tmp_path: Path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"fedfleet:app\.path: .*notes has no pyproject\.toml"):
        load_stack(project_with_app(tmp_path, tmp_path / "notes"), "local")


def test_app_option_replaces_the_built_in_app_and_rounds_need_the_apps_key(tmp_path: Path, app: Path):
    project = scratch_project(tmp_path / "p", local_config(vms_per_participant=1))
    stack = flower_app_from(app, load_stack(project, "local"))
    assert stack.flower_app is not None and stack.flower_app.where == "--app"
    assert stack.app.num_server_rounds == 3  # the app's own default
    edit_pyproject(app, "num-server-rounds = 3", "rounds = 3")
    stack = flower_app_from(app, load_stack(project, "local"))
    assert stack.flower_app is not None
    with pytest.raises(ConfigError, match=r"--rounds: .* has no num-server-rounds"):
        set_rounds(stack.flower_app, 2)


# -- staged for flwr run ----------------------------------------------------------------


def test_flwr_run_gets_a_copy_without_federations_data_or_environments(tmp_path: Path, app: Path):
    (app / "data").mkdir()
    (app / "data" / "train.csv").write_text("x,y\n")
    (app / ".venv").mkdir()
    (app / ".venv" / "lib.py").write_text("")
    before = (app / "pyproject.toml").read_bytes()
    staged = stage_app(app, tmp_path / "staged")
    data = tomllib.loads((staged / "pyproject.toml").read_text())
    assert "federations" not in data["tool"]["flwr"] and data["tool"]["flwr"]["app"]["publisher"]
    assert (staged / "numpy_app" / "client_app.py").is_file() and (staged / "README.md").is_file()
    assert not (staged / "data" / "train.csv").exists() and not (staged / ".venv").exists()
    assert (app / "pyproject.toml").read_bytes() == before


# -- the preflight: before any host is touched ------------------------------------------


def check(stack: StackConfig, project: Path) -> dict:
    """The run's check of a Flower app of your own (its copy made and removed as a run does)."""
    with workflow.checked_app(stack, project, workflow._Quiet()) as (info, staged):
        assert staged is not None and staged.is_dir()
    assert not staged.parent.exists()
    assert info is not None
    return info


def test_files_the_apps_gitignore_names_stay_out_of_its_fab(tmp_path: Path, app: Path):
    (app / ".gitignore").write_text("secrets.json\n")
    (app / "secrets.json").write_text('{"token": "x"}')
    (app / "numpy_app" / "server_app.py").write_text(
        (app / "numpy_app" / "server_app.py").read_text() + "\nimport json, pathlib\n"
        "json.loads((pathlib.Path(__file__).parents[1] / 'secrets.json').read_text())\n"
    )
    stack = load_stack(project_with_app(tmp_path, app), "local")
    with pytest.raises(ConfigError, match=r"serverapp: importing .* failed: FileNotFoundError"):
        check(stack, tmp_path / "p")


def test_a_node_config_key_no_site_has_is_named_before_anything_starts(tmp_path: Path, app: Path):
    code = app / "numpy_app" / "client_app.py"
    code.write_text(
        code.read_text().replace('context.node_config["data-path"]', 'context.node_config["site-root"]')
    )
    project = project_with_app(tmp_path, app)
    before = earlier_run(project)
    done = fedfleet(project, "run")
    assert done.returncode == 2, done.stderr
    assert f"{code}:" in done.stderr and "node_config['site-root']" in done.stderr
    assert "fedfleet:app.nodeConfig" in done.stderr
    assert not (project / ".fedfleet" / "local" / "inventory.json").exists()  # no host was made
    assert sorted(p.name for p in (project / "runs").iterdir()) == [before[0].name]
    # Given for every participant, the same app passes that check.
    stack = load_stack(project_with_app(tmp_path / "2", app, nodeConfig={"site-root": "/d"}), "local")
    assert stack.flower_app is not None
    reads = {
        r.key
        for r, _ in flowerapp.missing_node_config(
            flowerapp.node_config_reads(stack.flower_app.app.dir), {"p": {"site-root"}}
        )
    }
    assert "site-root" not in reads


def test_a_dependency_that_cannot_be_installed_is_named(tmp_path: Path, app: Path):
    edit_pyproject(app, '"tabulate>=0.9"', '"fedfleet-no-such-package-anywhere==1.0"')
    stack = load_stack(project_with_app(tmp_path, app), "local")
    with pytest.raises(
        ConfigError,
        match=r"pyproject\.toml: \[project\] dependencies: pip could not install .* as wheels within requirements\.lock's pins",
    ) as err:
        check(stack, tmp_path / "p")
    assert "fedfleet-no-such-package-anywhere" in str(err.value)


def test_components_that_do_not_import_are_named(tmp_path: Path, app: Path):
    server = app / "numpy_app" / "server_app.py"
    stack = load_stack(project_with_app(tmp_path, app), "local")
    server.write_text("import numpy_app.nowhere\n")  # Flower's own build finds no app in it
    with pytest.raises(
        ConfigError, match=r"`flwr build` refused it: .*Unable to find attribute app in module"
    ):
        check(stack, tmp_path / "p")
    server.write_text("import numpy_app.nowhere\nfrom flwr.serverapp import ServerApp\napp = ServerApp()\n")
    with pytest.raises(ConfigError, match=r"components\] serverapp: importing numpy_app\.server_app:app failed: "
                       r"ModuleNotFoundError: No module named 'numpy_app\.nowhere'"):  # fmt: skip
        check(stack, tmp_path / "p")
    server.write_text("app = 42\n")
    with pytest.raises(
        ConfigError, match=r"serverapp: numpy_app\.server_app:app is a int, not a Flower ServerApp"
    ):
        check(stack, tmp_path / "p")


def test_the_app_gets_an_environment_of_its_own_and_the_hosts_use_it(tmp_path: Path, app: Path):
    project = project_with_app(tmp_path, app, nodeConfig={"site-tag": "x"})
    stack = load_stack(project, "local")
    info = check(stack, project)
    assert info["app"] == "fedfleet-tests/numpy-app" and info["dependencies"] == [
        "numpy>=2.0.2",
        "tabulate>=0.9",
    ]
    env = stack_paths(stack, project).app_env(flowerapp.env_key(stack.flower_app.app))
    # tabulate is there, not in fedfleet's environment; Flower comes from fedfleet's.
    assert list((env / "lib").glob("python3.*/site-packages/tabulate*"))
    assert not list((Path(REPO) / ".venv" / "lib").glob("python3.*/site-packages/tabulate*"))
    assert (env / "bin" / "flwr-clientapp").read_text().startswith(f"#!{env / 'bin' / 'python'}")
    local = Local(project)
    inventory = local.ansible(["us-vm-1"])
    shared = inventory["all"]["vars"]
    assert shared["flower_common_app_bin"] == str(env / "bin")
    assert shared["flower_supernode_worker_enabled"] is False  # no warm worker: the app trains itself
    vm = inventory["all"]["children"]["participants"]["children"]["participant_hospital_eu"]["hosts"][
        "eu-vm-1"
    ]
    assert vm["flower_supernode_node_config"] == {"partition-id": 2, "num-partitions": 3, "site-tag": "x"}
    assert vm["flower_supernode_worker_enabled"] is False


def test_real_hosts_install_the_apps_dependencies_from_the_wheel_cache(tmp_path: Path, app: Path):
    config = YAML(typ="safe").load((REPO / "stacks" / "Pulumi.onprem.yaml").read_text())["config"]
    config["fedfleet:app"] = {"path": str(app)}
    project = scratch_project(tmp_path / "p", config, stack="onprem")
    stack = load_stack(project, "onprem")
    paths = stack_paths(stack, project)
    from fedfleet.stages import provision

    inventory = provision.saved_inventory(stack, project)
    from fedfleet.adapters.processes import ProcessGroup
    from fedfleet.hosts import for_stack

    hosts = for_stack(stack, inventory, paths, ProcessGroup())
    shared = configure.ansible_inventory(stack, inventory, paths, hosts, [], flwr_bin="flwr")["all"]["vars"]
    assert (
        "tabulate>=0.9" in shared["flower_common_packages"]
        and "flwr==1.41.0" in shared["flower_common_packages"]
    )
    assert "flower_common_app_bin" not in shared  # on real hosts: the host's own environment
    assert shared["flower_common_app_distributions"] == [
        "numpy>=2.0.2",
        "tabulate>=0.9",
    ]  # checked before start
    assert configure.app_requirements(stack.flower_app.app) == ["numpy>=2.0.2", "tabulate>=0.9"]


def test_a_local_data_path_that_is_missing_is_named(tmp_path: Path, app: Path):
    config = local_config(vms_per_participant=1)
    del config["fedfleet:data"]
    config["fedfleet:app"] = {"path": str(app)}
    config["fedfleet:participants"][0]["dataPath"] = str(tmp_path / "nowhere")
    project = scratch_project(tmp_path / "p", config)
    stack = load_stack(project, "local")
    with pytest.raises(
        DataError, match=r"participants\[0\]\.dataPath = .*nowhere\) is not a directory, and the app reads"
    ):
        check(stack, project)
    # An app that reads no data-path (it partitions a dataset by partition-id) needs none.
    code = app / "numpy_app" / "client_app.py"
    code.write_text(code.read_text().replace('Path(str(context.node_config["data-path"]))', 'Path("/")'))
    assert check(load_stack(project, "local"), project)["app"] == "fedfleet-tests/numpy-app"


# -- progress from Flower's own log lines -----------------------------------------------


def flower_lines(*messages: str, level: int = logging.INFO) -> str:
    """Lines as Flower's console handler writes them (colours and padding included)."""
    handler = ConsoleHandler(timestamps=False, json=False, colored=True)
    out = []
    for msg in messages:
        record = logging.LogRecord("flwr", level, __file__, 1, msg, None, None)
        out.append(handler.format(record))
    return "\n".join(out) + "\n"


MESSAGE_API = [
    "Starting FedAvg strategy:",
    "\t├── Number of rounds: 2",
    "",
    "[ROUND 1/2]",
    "configure_train: Sampled 2 nodes (out of 2)",
    "aggregate_train: Received 2 results and 0 failures",
    "\t└──> Aggregated MetricRecord: {'train-loss': 0.5, 'train-accuracy': 0.8}",
    "configure_evaluate: Sampled 2 nodes (out of 2)",
    "aggregate_evaluate: Received 2 results and 0 failures",
    "\t└──> Aggregated MetricRecord: {'loss': 0.4, 'accuracy': 0.85, 'hist': [1, 2]}",
    "Global evaluation",
    "\t└──> MetricRecord: {'server-accuracy': 0.9}",
    "",
    "[ROUND 2/2]",
    "aggregate_train: Received 2 results and 0 failures",
    "\t└──> Aggregated MetricRecord: {'train-loss': 0.3, 'train-accuracy': nan}",
    "aggregate_evaluate: Received 2 results and 0 failures",
    "\t└──> Aggregated MetricRecord: {'loss': 0.2, 'accuracy': 0.95}",
    "",
    "Strategy execution finished in 12.34s",
]


def test_the_message_api_strategy_log_becomes_rounds_and_metrics():
    text = flower_lines(*MESSAGE_API) + "plain print from the app\n"
    reader = LogReader(clock=lambda: 1.0)
    events = []
    for i in range(0, len(text), 7):  # chunks split lines anywhere
        events += reader.feed(text[i : i + 7])
    events += reader.close()
    state = RunState(0)
    for event in events:
        state.apply(event)
    assert state.rounds_planned == 2 and state.completed_rounds == 2 and state.metrics_reported
    assert state.rounds[1].train == {"train-loss": 0.5, "train-accuracy": 0.8}
    assert state.rounds[1].evaluation == {"loss": 0.4, "accuracy": 0.85}  # the list is left out
    assert state.rounds[1].server == {"server-accuracy": 0.9}
    assert state.rounds[2].train == {"train-loss": 0.3}  # nan is no number to record
    assert state.rounds[2].evaluation == {"loss": 0.2, "accuracy": 0.95}
    assert state.best_round() == 2
    assert "\x1b[" not in reader.text and "plain print from the app" in reader.text


def test_the_older_api_is_read_from_its_history_at_the_end():
    history = History()
    for n, (loss, acc, fit) in enumerate([(0.5, 0.8, 0.6), (0.3, 0.9, 0.4)], start=1):
        history.add_loss_distributed(n, loss)
        history.add_metrics_distributed(n, {"accuracy": acc})
        history.add_metrics_distributed_fit(n, {"train_loss": fit})
    history.add_loss_centralized(0, 1.0)
    lines = ["[INIT]", "", "[ROUND 1]", "aggregate_fit: received 2 results and 0 failures", "", "[ROUND 2]", "",
             "[SUMMARY]", "Run finished 2 round(s) in 3.00s"]  # fmt: skip
    lines += ["\t" + line for line in str(history).splitlines()] + [""]
    reader = LogReader(clock=lambda: 1.0)
    state = RunState(0)
    for event in reader.feed(flower_lines(*lines)) + reader.close():
        state.apply(event)
    assert state.completed_rounds == 2
    assert state.rounds[1].evaluation == {"loss": 0.5, "accuracy": 0.8}
    assert state.rounds[2].evaluation == {"loss": 0.3, "accuracy": 0.9}
    assert state.rounds[2].train == {"train_loss": 0.4}
    assert state.rounds[0].server == {"loss": 1.0}


def test_an_app_that_logs_no_strategy_lines_completes_without_metrics():
    reader = LogReader(clock=lambda: 1.0)
    state = RunState(0)
    for event in reader.feed("my own loop\nround 1 done\n") + reader.close():
        state.apply(event)
    assert state.status == "running" and not state.metrics_reported and state.completed_rounds == 0


def test_the_supernode_gets_numbers_as_numbers_in_its_node_config(tmp_path: Path):
    """Flower's examples index partitions with node_config["partition-id"]: an int, not "1"."""
    import subprocess
    import sys

    from flwr.common.config import parse_config_args

    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  gather_facts: false\n  vars_files:\n"
        f"    - {REPO / 'playbooks' / 'roles' / 'flower_supernode' / 'vars' / 'main.yml'}\n"
        "  vars:\n    flower_supernode_participant: p1\n    flower_supernode_name: vm1\n"
        "    flower_supernode_data_path: /srv/d\n    flower_supernode_worker_enabled: false\n"
        "    flower_supernode_node_config: {partition-id: 1, num-partitions: 3, enabled: true, rate: 0.5, tag: 'a b'}\n"
        "  tasks:\n    - ansible.builtin.copy:\n        content: '{{ _flower_supernode_node_config_text }}'\n"
        f"        dest: {tmp_path / 'text'}\n        mode: '0600'\n"
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", str(play)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    assert parse_config_args([(tmp_path / "text").read_text()]) == {
        "data-path": "/srv/d", "participant": "p1", "vm": "vm1",
        "partition-id": 1, "num-partitions": 3, "enabled": True, "rate": 0.5, "tag": "a b",
    }  # fmt: skip


def test_a_host_environment_without_the_apps_packages_is_named_before_anything_starts(tmp_path: Path):
    """A host whose environment is its admin's (install: false) must have the app's packages."""
    import json
    import subprocess
    import sys
    from importlib.metadata import version

    role = REPO / "playbooks" / "roles" / "flower_common"
    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: localhost\n  gather_facts: false\n  vars_files:\n"
        f"    - {role / 'vars' / 'main.yml'}\n    - {role / 'defaults' / 'main.yml'}\n"
        f"  tasks:\n    - ansible.builtin.import_tasks: {role / 'tasks' / 'packages.yml'}\n"
    )

    def play_with(venv: str) -> subprocess.CompletedProcess[str]:
        given = {"flower_common_venv": venv, "flower_common_become": False, "ansible_python_interpreter": sys.executable,
                 "flower_common_app_distributions": ["numpy>=2", "numpy>=99", "fedfleet-no-such-dist"]}  # fmt: skip
        return subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
             "-e", json.dumps(given), str(play)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip

    done = play_with(sys.prefix)
    assert done.returncode != 0
    assert (
        f"the environment {sys.prefix} lacks numpy>=99 (found {version('numpy')}), fedfleet-no-such-dist, "
        "which the Flower app needs" in done.stdout
    )
    assert "install: true" in done.stdout
    done = play_with(str(tmp_path / "no-venv"))
    assert done.returncode != 0
    assert (
        "lacks numpy>=2, numpy>=99, fedfleet-no-such-dist" in done.stdout
        and "/python does not run" in done.stdout
    )


def test_failed_rounds_odd_numbers_and_the_initial_evaluation_are_read():
    lines = [
        "Initial global evaluation results: {'accuracy': 0.1}",
        "[ROUND 1/2]",
        "aggregate_train: Received 0 results and 2 failures",
        "\t> Received error in reply from node 42: ClientApp raised ValueError",
        "[ROUND 2/2]",
        "aggregate_train: Received 1 results and 1 failures",
        "\t└──> Aggregated MetricRecord: {'train-inf': 1.0, 'low': -inf, 'x': 2.0}",
        "Strategy execution finished in 1.00s",
    ]
    reader = LogReader(clock=lambda: 1.0)
    state = RunState(0)
    for event in reader.feed(flower_lines(*lines)) + reader.close():
        state.apply(event)
    assert state.rounds[0].server == {"accuracy": 0.1}
    # Round 1 trained nothing: it is not counted, and why is recorded.
    assert state.completed_rounds == 1 and not state.rounds[1].trained
    assert {"round": 1, "phase": "train", "node": 42, "reason": "ClientApp raised ValueError"} in state.errors
    assert any(e["round"] == 2 and "1 of 2 replies failed" in e["reason"] for e in state.errors)
    assert len([e for e in state.errors if e["round"] == 1]) == 1  # each failure said once
    # A -inf is no number to record, but the rest of the record and the names stay.
    assert state.rounds[2].train == {"train-inf": 1.0, "x": 2.0}


class ScriptedFlower:
    """The operator's `flwr` as LogTail uses it, played by real processes: each `flwr log`
    stream prints its part of the log and exits; the SuperLink's status and whole log given."""

    def __init__(self, streams: list[str], statuses: list[str], whole: str) -> None:
        self.streams, self.statuses, self.whole = streams, statuses, whole
        self.started = 0

    def log_command(self, run_id: int) -> tuple[list[str], dict[str, str]]:
        import os
        import sys

        text = self.streams[min(self.started, len(self.streams) - 1)]
        self.started += 1
        script = "import sys; sys.stdout.write(sys.argv[1]); sys.stdout.flush()"
        return [sys.executable, "-c", script, text], dict(os.environ)

    def status(self, run_id: int) -> dict[str, str]:
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def show_log(self, run_id: int, timeout: float = 60.0) -> str:
        return self.whole


def test_the_log_tail_restarts_a_broken_stream_and_reads_the_last_lines_at_the_end(
    tmp_path: Path, monkeypatch
):
    from fedfleet.adapters.processes import ProcessGroup
    from fedfleet.stages import train

    monkeypatch.setattr(train, "FINAL_LOG_WAIT", 0.0)
    whole = flower_lines(*MESSAGE_API, "Final results:")
    first = whole[: whole.index("[ROUND 2/2]") + 3]  # broken in the middle of a line
    flwr = ScriptedFlower(
        [first, whole[: whole.index("Strategy execution")]], ["running", "finished:completed"], whole
    )
    with ProcessGroup() as procs:
        tail = train.LogTail(flwr, 7, procs, tmp_path / "flwr-log.log")  # type: ignore[arg-type]
        state = RunState(0)
        deadline = time.monotonic() + 30
        while state.status not in ("finished", "failed"):
            assert time.monotonic() < deadline, "the tail never finished"
            for event in tail.read():
                state.apply(event)
            time.sleep(0.05)
        assert procs.procs == []  # every `flwr log` it started was stopped
    assert flwr.started == 2 and state.status == "finished"
    # Nothing read twice, nothing lost: the second stream's repeat was skipped, the end
    # (only in the whole log) was read.
    assert [e for e in tail.reader.lines if e.endswith("[ROUND 2/2]")] != [] and state.completed_rounds == 2
    assert tail.reader.text.count("[ROUND 1/2]") == 1 and "Final results:" in tail.reader.text
    assert state.rounds[2].evaluation == {"loss": 0.2, "accuracy": 0.95}


def test_a_strategy_of_the_apps_own_is_read_in_the_order_strategy_start_logs():
    lines = ["[ROUND 1/1]", "\t└──> Aggregated MetricRecord: {'a': 1.0}", "\t└──> Aggregated MetricRecord: {'b': 2.0}",
             "Strategy execution finished in 1.00s"]  # fmt: skip
    reader = LogReader(clock=lambda: 1.0)
    state = RunState(0)
    for event in reader.feed(flower_lines(*lines)) + reader.close():
        state.apply(event)
    assert state.rounds[1].train == {"a": 1.0} and state.rounds[1].evaluation == {"b": 2.0}
    assert state.completed_rounds == 1
