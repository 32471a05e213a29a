"""The roles' public variables are declared, documented and prefixed; the playbooks lint clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedfleet.adapters.ansible import PLAYBOOKS

ROLES = sorted(p for p in (PLAYBOOKS / "roles").iterdir() if p.is_dir())


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_default_is_declared_documented_and_prefixed(role: Path):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    argument_specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    specs = argument_specs["argument_specs"]["main"]["options"]
    readme = (role / "README.md").read_text()
    assert defaults, f"{role.name} has no defaults"
    for name in defaults:
        assert name.startswith(role.name + "_"), f"{name} is not prefixed with {role.name}_"
        assert name in specs, f"{name} is not declared in {role.name}/meta/argument_specs.yml"
    for name in specs:
        assert f"`{name}`" in readme, f"{name} is not in {role.name}/README.md"
    internals = yaml.safe_load((role / "vars" / "main.yml").read_text()) or {}
    assert all(name.startswith(f"_{role.name}_") for name in internals)


def test_ansible_lint_production_profile_is_clean():
    lint = Path(sys.executable).with_name("ansible-lint")
    if not lint.exists():
        pytest.skip("ansible-lint is not installed in this environment (make setup installs it)")
    done = subprocess.run(
        [str(lint), "--offline", "--profile", "production", "--nocolor", "."],
        cwd=PLAYBOOKS,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{lint.parent}:/usr/bin:/bin", "HOME": str(Path.home())},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
