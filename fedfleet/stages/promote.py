"""GitOps promotion: carry what was tried in one stack to the next, keep each environment's own.

Promoted (the training, and the requirements the placement answers to):
    fedfleet:app        the whole Flower run config: model, strategy, hyperparameters
    fedfleet:placement  horizonHours, rounds, modelSizeMb, maxLatencyMs, weights, minVcpu, minMemoryGib
Kept from the target (what belongs to its environment):
    fedfleet:aggregator (its planned place), participants (clouds, regions, VMs, sizes,
    CIDRs), operator, data, local, the placement's clouds/regions/exclude/currency/
    maxCost/catalogOverrides/baseline, and every provider key (aws:*, gcp:*, ...), secrets included.

The result is validated as the target stack (and, for a cloud stack, as its whole
infrastructure plan) before anything is written; the diff is shown first.
"""

from __future__ import annotations

import copy
import difflib
import io
from dataclasses import dataclass
from typing import Any

from fedfleet.core.catalog import load_catalog
from fedfleet.core.cloudplan import infra_plan
from fedfleet.core.errors import ConfigError
from fedfleet.core.stack import PROJECT, load_stack, parse_stack, stack_path, stack_yaml
from fedfleet.core.util import atomic_write

PROMOTED_PLACEMENT = (
    "horizonHours",
    "rounds",
    "modelSizeMb",
    "maxLatencyMs",
    "weights",
    "minVcpu",
    "minMemoryGib",
)


@dataclass(frozen=True)
class Promotion:
    source: str
    target: str
    diff: str
    new_text: str

    @property
    def changed(self) -> bool:
        return bool(self.diff)


def plan_promotion(project: Any, source: str, target: str) -> Promotion:
    if source == target:
        raise ConfigError(f"--from and --to are both {source!r}: promote between two stacks")
    src = load_stack(project, source)  # both must be valid before we start
    dst = load_stack(project, target)
    yaml = stack_yaml()
    src_doc = yaml.load(src.path.read_text(encoding="utf-8"))
    old_text = dst.path.read_text(encoding="utf-8")
    dst_doc = yaml.load(old_text)
    src_cfg, dst_cfg = src_doc["config"], dst_doc["config"]

    app_key = f"{PROJECT}:app"
    if app_key in src_cfg:
        dst_cfg[app_key] = copy.deepcopy(src_cfg[app_key])
    elif app_key in dst_cfg:
        del dst_cfg[app_key]
    placement_key = f"{PROJECT}:placement"
    source_placement = src_cfg.get(placement_key) or {}
    if placement_key not in dst_cfg and any(k in source_placement for k in PROMOTED_PLACEMENT):
        dst_cfg[placement_key] = {}
    target_placement = dst_cfg.get(placement_key)
    if target_placement is not None:
        for key in PROMOTED_PLACEMENT:
            if key in source_placement:
                target_placement[key] = copy.deepcopy(source_placement[key])
            elif key in target_placement:
                del target_placement[key]  # the source uses the default: so will the target

    out = io.StringIO()
    yaml.dump(dst_doc, out)
    new_text = out.getvalue()
    # Validate the result as the target stack would be read after the write.
    plain = stack_yaml()
    parsed = parse_stack(target, dst.path, dict(plain.load(new_text)["config"]))
    if not parsed.is_local:
        infra_plan(parsed, load_catalog(parsed.placement.catalog_overrides))
    diff = "".join(
        difflib.unified_diff(
            old_text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=f"stacks/{dst.path.name} ({target})",
            tofile=f"stacks/{dst.path.name} (promoted from {source})",
        )
    )
    return Promotion(source, target, diff, new_text)


def write(project: Any, promotion: Promotion) -> None:
    atomic_write(stack_path(project, promotion.target), promotion.new_text)
