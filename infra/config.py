"""Every pulumi.Config read of the program, validated before any resource is declared.

The stack's `fedfleet:*` values go through the same validation as every other
fedfleet command (fedfleet/stack.py), then become a frozen InfraPlan
(fedfleet/cloudplan.py); errors name the stack file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi

from fedfleet.core.catalog import load_catalog
from fedfleet.core.cloudplan import InfraPlan, infra_plan
from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import PROJECT, TOP_KEYS, parse_stack

PROJECT_DIR = Path(__file__).resolve().parents[1]


def stack_file(stack: str) -> Path:
    return PROJECT_DIR / "stacks" / f"Pulumi.{stack}.yaml"


@dataclass(frozen=True)
class Accounts:
    """Provider settings that belong to the environment, not to the plan."""

    gcp_project: str | None = None
    # Explicit providers do not read `azure-native:subscriptionId`: pass it on when set
    # (else the subscription comes from `az login` or ARM_SUBSCRIPTION_ID).
    azure_subscription_id: str | None = None


def load() -> tuple[InfraPlan, Accounts]:
    stack = pulumi.get_stack()
    config = pulumi.Config(PROJECT)
    values = {f"{PROJECT}:{key}": value for key in TOP_KEYS if (value := config.get_object(key)) is not None}
    parsed = parse_stack(stack, stack_file(stack), values)
    plan = infra_plan(parsed, load_catalog(parsed.placement.catalog_overrides))
    gcp_project = pulumi.Config("gcp").get("project")
    if not gcp_project and any(cloud == "gcp" for cloud, _ in plan.locations):
        raise ConfigError(
            f"{stack_file(stack)}: gcp:project: is required when a site or the aggregator is on GCP "
            f"(pulumi config set gcp:project <your-project-id> --stack {stack})"
        )
    subscription = pulumi.Config("azure-native").get("subscriptionId")
    return plan, Accounts(gcp_project=gcp_project, azure_subscription_id=subscription)
