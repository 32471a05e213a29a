"""Pulumi at the edge: the Automation API over the program in infra/, and what it needs.

The Pulumi CLI and each cloud's credentials are checked before anything runs, so a
missing piece is named with what to install or set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedfleet.core.errors import EnvironmentProblem

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


def missing_credentials(clouds: set[str], environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    missing = []
    for cloud in sorted(clouds):
        variables, files, fix = CREDENTIALS[cloud]
        if any(env.get(v) for v in variables) or any(Path(f).expanduser().exists() for f in files):
            continue
        missing.append(f"{cloud}: no credentials found ({', '.join(variables)} unset); {fix}")
    return missing


def workspace_stack(project: Path, stack_name: str, clouds: set[str]) -> Any:
    """The Automation API's stack for `stack_name`, or EnvironmentProblem saying what is missing."""
    missing = missing_credentials(clouds)
    from pulumi import automation as auto

    try:
        stack = auto.create_or_select_stack(stack_name=stack_name, work_dir=str(project))
    except FileNotFoundError as err:
        raise EnvironmentProblem(PULUMI_INSTALL) from err
    if missing:
        raise EnvironmentProblem(
            f"stack {stack_name!r} uses clouds without credentials here:\n  " + "\n  ".join(missing)
        )
    return stack


def preview(stack: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    return dict(stack.preview(on_output=echo).change_summary)


def up(stack: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """`pulumi up`; the stack's `inventory` output."""
    return dict(stack.up(on_output=echo).outputs["inventory"].value)


def outputs(stack: Any) -> dict[str, Any] | None:
    out = stack.outputs()
    return dict(out["inventory"].value) if "inventory" in out else None


def destroy(stack: Any, echo: Callable[[str], None]) -> None:
    stack.destroy(on_output=echo)
