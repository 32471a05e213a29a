"""Pulumi at the edge: the Automation API over the program in infra/, and what it needs.

The Pulumi CLI is looked for first, so its absence is named with how to install it; the
clouds' credentials come verified from `stages.authenticate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfleet.core.errors import EnvironmentProblem

PULUMI_INSTALL = (
    "the Pulumi CLI is not installed here (the pip package `pulumi` is only its SDK). Install it "
    "on a machine with internet access: `curl -fsSL https://get.pulumi.com | sh` (or "
    "https://www.pulumi.com/docs/install/), then `pulumi login` (or `pulumi login --local` for a "
    "state file on disk), and run this command again"
)


class _Env(dict[str, str]):
    """The credentials' variables: the workspace's repr (in a traceback, say) shows no value."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '[secret]'" for k in self) + "}"


def workspace_stack(project: Path, stack_name: str, env: Mapping[str, str]) -> Any:
    """The Automation API's stack for `stack_name`; `env` (the clouds' verified credentials)
    reaches the Pulumi CLI's processes of this run only, never this process's environment."""
    from pulumi import automation as auto

    with _pulumi("stack select"):
        return auto.create_or_select_stack(
            stack_name=stack_name,
            work_dir=str(project),
            opts=auto.LocalWorkspaceOptions(env_vars=_Env(env)),
        )


@contextmanager
def _pulumi(verb: str) -> Iterator[None]:
    """The CLI's absence, or its failure, as an error that says so (with what it printed last)."""
    from pulumi.automation.errors import CommandError

    try:
        yield
    except FileNotFoundError as err:
        raise EnvironmentProblem(PULUMI_INSTALL) from err
    except CommandError as err:
        # str(err) is the CLI's result: "code: N", "stdout: ...", "stderr: ..."
        text = str(err)
        code, _, rest = text.partition(" code: ")[2].partition("\n")
        out, _, errors = rest.partition(" stderr: ")
        said = [
            line for line in (errors.strip() or out.removeprefix(" stdout: ")).splitlines() if line.strip()
        ]
        raise EnvironmentProblem(
            f"pulumi {verb} failed (exit {code.strip()}): " + " / ".join(said[-5:])
        ) from None


def preview(stack: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    with _pulumi("preview"):
        return dict(stack.preview(on_output=echo).change_summary)


def up(stack: Any, echo: Callable[[str], None]) -> dict[str, Any]:
    """`pulumi up`; the stack's `inventory` output."""
    with _pulumi("up"):
        return dict(stack.up(on_output=echo).outputs["inventory"].value)


def outputs(stack: Any) -> dict[str, Any] | None:
    with _pulumi("stack output"):
        out = stack.outputs()
    return dict(out["inventory"].value) if "inventory" in out else None


def destroy(stack: Any, echo: Callable[[str], None]) -> None:
    with _pulumi("destroy"):
        stack.destroy(on_output=echo)
