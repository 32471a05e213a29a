"""The stack's own network (`fedfleet:app.model`): checked once on this machine before
any host is touched; staged into the app so it travels in the FAB; loaded by a worker
outside the app from the file the ClientApp names."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from fedfleet_app import task

from fedfleet.adapters.flwr import stage_app
from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import MODELS_PACKAGE, load_stack
from fedfleet.sandbox import REPO, local_config, scratch_project
from fedfleet.stages import preflight

from .test_cli_errors import fedfleet

GOOD = """from torch import nn


def build(num_classes, channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, num_classes))
"""


def project_with(tmp_path: Path, source: str, setting: str = "models/net.py:build") -> Path:
    config = local_config(vms_per_participant=1)
    config["fedfleet:app"]["model"] = setting
    project = scratch_project(tmp_path / "p", config)
    (project / "models").mkdir()
    (project / "models" / "net.py").write_text(source)
    return project


def test_a_good_model_is_described(tmp_path: Path):
    stack = load_stack(project_with(tmp_path, GOOD), "local")
    assert preflight.model(stack, stack.app) == {
        "model": "models/net.py:build", "class": "Sequential", "parameters": 64 * 10 + 10,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def other(num_classes, channels, image_size): ...\n", r"has no function 'build' \(it has: other\)"),
        ("import not_a_module\n", r"does not import \(ModuleNotFoundError: No module named 'not_a_module'\)"),
        (
            "def build(num_classes, channels, image_size):\n    return 42\n",
            "returned a int, not a torch.nn.Module",
        ),
        (
            GOOD.replace("num_classes))", "num_classes + 1))"),
            r"gives output of shape \(2, 11\) for 2 images, not \(2, 10\)",
        ),
        (
            GOOD.replace("channels * image_size * image_size", "5"),
            r"fails on a batch of 1x8x8 images \(RuntimeError",
        ),
        ("def build(classes):\n    pass\n", r"TypeError: build\(\) got an unexpected keyword argument"),
    ],
)
def test_a_model_that_cannot_serve_says_why(tmp_path: Path, source: str, message: str):
    """What the controller's check (preflight.model, in a process of its own) runs."""
    path = tmp_path / f"case_{abs(hash(source))}.py"
    path.write_text(source)
    ref = f"{MODELS_PACKAGE}.{path.stem}:build"
    task.use_model_file(ref, str(path))
    with pytest.raises(task.ModelError, match=message):
        net = task.build_model(1, 10, model=ref, image_size=8)
        task.check_model(net, ref, 1, 10, 8)


def test_the_check_runs_apart_and_names_the_key(tmp_path: Path):
    project = project_with(tmp_path, GOOD.replace("num_classes))", "num_classes + 1))"))
    stack = load_stack(project, "local")
    with pytest.raises(ConfigError, match=r"Pulumi\.local\.yaml: fedfleet:app\.model: model .* \(2, 11\)"):
        preflight.model(stack, stack.app)


def test_fedfleet_run_stops_on_a_bad_model_before_it_makes_any_host(tmp_path: Path):
    project = project_with(tmp_path, "def build(num_classes, channels, image_size):\n    return None\n")
    done = fedfleet(project, "run")
    assert done.returncode == 2, done.stderr
    assert "fedfleet:app.model" in done.stderr and "not a torch.nn.Module" in done.stderr
    assert not (project / ".fedfleet" / "local" / "vms").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("models/net.py", "must be path/to/file.py:function"),
        ("models/net.txt:build", "must be a Python file"),
        ("models/my-net.py:build", "must be a Python file whose name is a module name"),
        ("models/net.py:2build", "is not a Python function name"),
        ("models/gone.py:build", "gone.py does not exist"),
    ],
)
def test_a_bad_model_setting_is_named(tmp_path: Path, setting: str, message: str):
    project = project_with(tmp_path, GOOD, setting)
    with pytest.raises(ConfigError, match=r"fedfleet:app\.model: ") as err:
        load_stack(project, "local")
    assert message in str(err.value)


def test_the_model_travels_inside_the_app(tmp_path: Path):
    model = tmp_path / "net.py"
    model.write_text(GOOD)
    staged = stage_app(REPO / "fl", tmp_path / "app", {MODELS_PACKAGE: [model]})
    assert (staged / MODELS_PACKAGE / "net.py").read_text() == GOOD
    assert (staged / MODELS_PACKAGE / "__init__.py").exists()
    flwr = tomllib.loads((staged / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert f"{MODELS_PACKAGE}/*.py" in flwr["fab-include"] and "fedfleet_app/*.py" in flwr["fab-include"]
    assert flwr["components"] == {
        "serverapp": "fedfleet_app.server_app:app",
        "clientapp": "fedfleet_app.client_app:app",
    }
    assert not list(staged.rglob("__pycache__"))


def test_a_worker_outside_the_app_loads_the_file_it_is_given(tmp_path: Path):
    path = tmp_path / "elsewhere" / "net.py"
    path.parent.mkdir()
    path.write_text(GOOD)
    ref = f"{MODELS_PACKAGE}.net:build"
    task.use_model_file(ref, str(path))
    net = task.build_model(1, 3, seed=1, model=ref, image_size=4)
    again = task.build_model(1, 3, seed=1, model=ref, image_size=4)
    assert net(torch.zeros(1, 1, 4, 4)).shape == (1, 3)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )
    path.write_text(GOOD.replace("num_classes))", "num_classes), nn.Identity())"))  # the file changed
    assert isinstance(task.build_model(1, 3, model=ref, image_size=4)[-1], torch.nn.Identity)
