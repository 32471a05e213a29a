"""`fedfleet preview|up|destroy|outputs --stack S`: provisioning, one code path per kind of stack.

Cloud stacks go through Pulumi's Automation API (the program in infra/, the
stack file in stacks/). Before anything runs, the stack is validated into its
InfraPlan, then the Pulumi CLI and each used cloud's credentials are checked, so
a missing piece is named with what to install or set. The local stack needs no
Pulumi: `up` creates its emulated VMs and both kinds end in the same `inventory`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet import localstack
from fedfleet.core.catalog import load_catalog
from fedfleet.core.cloudplan import InfraPlan, infra_plan
from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.inventory import Inventory
from fedfleet.core.stack import StackConfig, load_stack

PULUMI_INSTALL = (
    "the Pulumi CLI is not installed here (the pip package `pulumi` is only its SDK). Install it "
    "on a machine with internet access: `curl -fsSL https://get.pulumi.com | sh` (or "
    "https://www.pulumi.com/docs/install/), then `pulumi login` (or `pulumi login --local` for a "
    "state file on disk), and run this command again"
)

# How each cloud's Pulumi provider finds credentials, and what to set when none is found.
CREDENTIALS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "aws": (
        ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"),
        ("~/.aws/credentials", "~/.aws/config"),
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run `aws configure`",
    ),
    "gcp": (
        ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CREDENTIALS", "CLOUDSDK_AUTH_ACCESS_TOKEN"),
        ("~/.config/gcloud/application_default_credentials.json",),
        "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
        "`gcloud auth application-default login`",
    ),
    "azure": (
        ("ARM_CLIENT_ID", "ARM_USE_MSI", "ARM_USE_OIDC"),
        ("~/.azure/azureProfile.json",),
        "set ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID and ARM_SUBSCRIPTION_ID, or run `az login`",
    ),
}


@dataclass(frozen=True)
class Target:
    project: Path
    stack: StackConfig
    plan: InfraPlan | None  # None for a local stack


def target(project: Path, name: str) -> Target:
    """Validate the stack (and, for a cloud stack, its whole infrastructure plan)."""
    stack = load_stack(project, name)
    if stack.is_local:
        return Target(project, stack, None)
    return Target(project, stack, infra_plan(stack, load_catalog(stack.placement.catalog_overrides)))


def missing_credentials(plan: InfraPlan, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    missing = []
    for cloud in sorted({cloud for cloud, _ in plan.locations}):
        variables, files, fix = CREDENTIALS[cloud]
        if any(env.get(v) for v in variables) or any(Path(f).expanduser().exists() for f in files):
            continue
        missing.append(f"{cloud}: no credentials found ({', '.join(variables)} unset); {fix}")
    return missing


def _workspace_stack(t: Target) -> Any:
    missing = missing_credentials(t.plan) if t.plan else []
    from pulumi import automation as auto

    try:
        stack = auto.create_or_select_stack(stack_name=t.stack.name, work_dir=str(t.project))
    except FileNotFoundError as err:
        raise EnvironmentProblem(PULUMI_INSTALL) from err
    if missing:
        raise EnvironmentProblem(
            f"stack {t.stack.name!r} uses clouds without credentials here:\n  " + "\n  ".join(missing)
        )
    return stack


def preview(t: Target, echo: Callable[[str], None]) -> dict[str, Any]:
    if t.plan is None:
        local = localstack.paths(t.stack, t.project)
        vms = [vm.name for p in t.stack.participants for vm in p.vms]
        echo(
            f"local stack {t.stack.name}: would create {local.root} with the aggregator and {len(vms)} VMs: {', '.join(vms)}"
        )
        return {"stack": t.stack.name, "local": True, "root": str(local.root), "vms": vms}
    result = _workspace_stack(t).preview(on_output=echo)
    return {"stack": t.stack.name, "change_summary": dict(result.change_summary)}


def up(t: Target, echo: Callable[[str], None]) -> Inventory:
    if t.plan is None:
        with localstack.locked(localstack.paths(t.stack, t.project)):
            inventory = localstack.up(t.stack, t.project)
        echo(f"local stack {t.stack.name}: {sum(len(v) for v in inventory.participants.values())} VMs ready")
        return inventory
    stack = _workspace_stack(t)
    result = stack.up(on_output=echo)
    inventory = Inventory.from_dict(result.outputs["inventory"].value)
    _save(t, inventory)
    return inventory


def destroy(t: Target, echo: Callable[[str], None]) -> None:
    if t.plan is None:
        local = localstack.paths(t.stack, t.project)
        with localstack.locked(local):
            pass  # refuses while a run holds the stack
        if (local.root / "inventory.json").exists():
            from fedfleet.configure import STOP, configure_stack

            configure_stack(t.project, t.stack.name, playbook=STOP)  # services and network
        with localstack.locked(local):
            localstack.down_network(t.stack, t.project)  # a network left without an inventory
        if local.root.exists():
            shutil.rmtree(local.root)
        echo(f"local stack {t.stack.name}: removed {local.root} (VM disks, keys, certificates, database)")
        return
    _workspace_stack(t).destroy(on_output=echo)
    (t.project / ".fedfleet" / t.stack.name / "inventory.json").unlink(missing_ok=True)


def outputs(t: Target) -> Inventory:
    if t.plan is None:
        path = localstack.paths(t.stack, t.project).root / "inventory.json"
        if not path.exists():
            raise EnvironmentProblem(
                f"local stack {t.stack.name!r} is not up: run `fedfleet up --stack {t.stack.name}`"
            )
        return Inventory.from_dict(json.loads(path.read_text()))
    out = _workspace_stack(t).outputs()
    if "inventory" not in out:
        raise EnvironmentProblem(
            f"stack {t.stack.name!r} has no outputs yet: run `fedfleet up --stack {t.stack.name}`"
        )
    inventory = Inventory.from_dict(out["inventory"].value)
    _save(t, inventory)
    return inventory


def _save(t: Target, inventory: Inventory) -> None:
    path = t.project / ".fedfleet" / t.stack.name / "inventory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inventory.to_dict(), indent=2) + "\n")
