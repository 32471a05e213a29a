"""Run the Pulumi program or one component under Pulumi's own unit-test mocks.

`Recorder` is the mocks: it records every resource (type, name, inputs) and invents
the computed outputs a cloud would (addresses, ids). `declare` runs a function that
declares resources inside `@pulumi.runtime.test`, so every registration has
finished when it returns, and hands back the recorder and the function's result.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch

import pulumi
from ruamel.yaml import YAML

from fedfleet.sandbox import REPO

SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZlZGZsZWV0dGVzdGtleWZvcnVuaXR0ZXN0cw operator@test"


@dataclass
class Resource:
    typ: str
    name: str
    inputs: dict[str, Any]
    provider: str | None


@dataclass
class Recorder(pulumi.runtime.Mocks):
    resources: list[Resource] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    counter: int = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Resource(args.typ, args.name, dict(args.inputs), args.provider))
        self.counter += 1
        outputs = dict(args.inputs)
        n = self.counter
        # Computed outputs the clouds would fill in.
        outputs.setdefault("privateIp", f"10.99.{n // 250}.{n % 250 + 1}")
        outputs.setdefault("publicIp", f"203.0.113.{n % 250 + 1}")
        outputs.setdefault("availabilityZone", "zone-a")
        outputs.setdefault("keyName", args.name)
        if args.typ.startswith("gcp:compute/instance:"):
            outputs["networkInterfaces"] = [
                {**ni, "networkIp": f"10.98.{n // 250}.{n % 250 + 1}",
                 "accessConfigs": [{**ac, "natIp": f"198.51.100.{n % 250 + 1}"} for ac in ni.get("accessConfigs", [])]}
                for ni in outputs.get("networkInterfaces", [])
            ]  # fmt: skip
        if args.typ.startswith("gcp:"):
            outputs.setdefault("selfLink", f"https://www.googleapis.com/compute/v1/projects/test/{args.name}")
            outputs.setdefault("name", args.name)
        if args.typ.startswith("gcp:compute/address:"):
            outputs.setdefault("address", f"198.51.100.{n % 250 + 1}")
        if args.typ.startswith("azure-native:network:PublicIPAddress"):
            outputs.setdefault("ipAddress", f"192.0.2.{n % 250 + 1}")
        if args.typ.startswith("azure-native:"):
            outputs.setdefault("name", args.name)
        if args.typ.startswith("azure-native:network:NetworkInterface"):
            outputs["ipConfigurations"] = [
                {**c, "privateIPAddress": f"10.97.{n // 250}.{n % 250 + 1}"}
                for c in args.inputs.get("ipConfigurations") or [{}]
            ]
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "x86_64", "name": "ubuntu-noble"}
        if args.token == "gcp:compute/getImage:getImage":
            return {
                "selfLink": "projects/ubuntu-os-cloud/global/images/ubuntu-2404-noble-amd64-v1",
                "name": "ubuntu",
            }
        return {}

    def of(self, typ: str) -> list[Resource]:
        # Sorted by name: the engine registers resources concurrently, in no fixed order.
        return sorted((r for r in self.resources if r.typ == typ), key=lambda r: r.name)


def declare(
    fn: Callable[[], Any],
    stack: str = "test",
    config: dict[str, Any] | None = None,
    recorder: Recorder | None = None,
) -> tuple[Recorder, Any]:
    """Run `fn` (which declares resources and returns an Output) under mocks; return (recorder, value)."""
    recorder = recorder or Recorder()
    pulumi.runtime.set_mocks(recorder, project="fedfleet", stack=stack, preview=False)
    pulumi.runtime.set_all_config(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in (config or {}).items()}
    )
    result: dict[str, Any] = {}

    @pulumi.runtime.test
    def run() -> Any:
        value = fn()
        return pulumi.Output.from_input(value).apply(lambda v: result.setdefault("value", v))

    run()
    return recorder, result.get("value")


def stack_config(name: str) -> dict[str, Any]:
    return dict(YAML(typ="safe").load((REPO / "stacks" / f"Pulumi.{name}.yaml").read_text())["config"])


def run_program(
    config: dict[str, Any], stack: str, recorder: Recorder | None = None
) -> tuple[Recorder, dict[str, Any]]:
    """The whole program (infra/__main__.py) under mocks; returns the recorder and its exports."""
    exported: dict[str, Any] = {}

    def program() -> Any:
        with patch.object(pulumi, "export", exported.__setitem__):
            runpy.run_path(str(REPO / "infra" / "__main__.py"), run_name="__main__")
        return pulumi.Output.all(**exported)

    return declare(program, stack=stack, config=config, recorder=recorder)
