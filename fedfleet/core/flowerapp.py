"""A Flower app of the user's own (`fedfleet:app.path`, `fedfleet run --app DIR`), read and checked.

Pure logic: the app's `pyproject.toml` as Flower reads it (`[project]` name and version,
`[tool.flwr.app]` publisher and components, the run config's defaults), its
dependencies, the run-config overrides a stack gives it, and the node-config keys its
code reads. Every problem names the file and key, and the fix, before any host is
touched. Nothing here imports or runs the app (the preflight does, in the app's own
environment).
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from fedfleet.core.errors import ConfigError
from fedfleet.core.util import closest

FLWR_VERSION = "1.41.0"  # what fedfleet's hosts run (requirements.lock): the app gets this one
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,31}$")  # as `flwr build` requires
COMPONENT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
Scalar = str | int | float | bool


@dataclass(frozen=True)
class FlowerApp:
    """A Flower app directory, as its pyproject.toml describes it."""

    dir: Path  # absolute
    setting: str  # as the user gave it (messages name it)
    name: str
    version: str
    publisher: str
    serverapp: str  # module:attribute
    clientapp: str
    config: dict[str, Scalar]  # [tool.flwr.app.config], flattened with dots as Flower does
    dependencies: tuple[str, ...]  # [project].dependencies without flwr (fedfleet's Flower serves)
    flwr_requirement: str | None  # the app's own flwr requirement, as written

    @property
    def pyproject(self) -> Path:
        return self.dir / "pyproject.toml"

    @property
    def fab_id(self) -> str:
        return f"{self.publisher}/{self.name}"

    @property
    def rounds_key(self) -> str | None:
        """The run-config key that holds the number of rounds, in Flower's examples' spelling."""
        return "num-server-rounds" if "num-server-rounds" in self.config else None


def load(directory: Path, setting: str) -> FlowerApp:
    """Read and check the Flower app in `directory` (ConfigError naming the file and key)."""
    if not directory.is_dir():
        raise ConfigError(
            f"{setting}: {directory} is not a directory; give the directory of a Flower app (the one "
            "with its pyproject.toml, as `flwr new` makes it)"
        )
    pyproject = directory / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(
            f"{setting}: {directory} has no pyproject.toml: a Flower app is a directory with a "
            "pyproject.toml that has [project] name and version and [tool.flwr.app] publisher and "
            "components (`flwr new` writes one)"
        )
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{pyproject}: cannot be read as TOML: {err}") from err
    project = _table(data, "project", pyproject)
    app = _table(data.get("tool", {}).get("flwr", {}), "app", pyproject, "[tool.flwr.app]")
    name = _text(project, "name", pyproject, "[project]")
    if not NAME_RE.match(name):
        raise ConfigError(
            f"{pyproject}: [project] name = {name!r}: Flower needs a name that starts with a letter and "
            "has only letters, digits and '-' (at most 32 characters)"
        )
    version = _text(project, "version", pyproject, "[project]")
    publisher = _text(app, "publisher", pyproject, "[tool.flwr.app]")
    components = _table(app, "components", pyproject, "[tool.flwr.app.components]")
    refs = {}
    for key in ("serverapp", "clientapp"):
        ref = _text(components, key, pyproject, "[tool.flwr.app.components]")
        if not COMPONENT_RE.match(ref):
            raise ConfigError(
                f"{pyproject}: [tool.flwr.app.components] {key} = {ref!r}: must be module:attribute, "
                f"e.g. my_app.{key.replace('app', '_app')}:app"
            )
        refs[key] = ref
    config = flatten(app.get("config", {}), pyproject)
    deps, flwr_req = _dependencies(project.get("dependencies", []), pyproject)
    return FlowerApp(
        dir=directory.resolve(),
        setting=setting,
        name=name,
        version=version,
        publisher=publisher,
        serverapp=refs["serverapp"],
        clientapp=refs["clientapp"],
        config=config,
        dependencies=deps,
        flwr_requirement=flwr_req,
    )


def _table(data: Mapping[str, Any], key: str, path: Path, shown: str | None = None) -> Mapping[str, Any]:
    value = data.get(key)
    shown = shown or f"[{key}]"
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{path}: no {shown} table: a Flower app's pyproject.toml needs [project] (name, version), "
            "[tool.flwr.app] (publisher) and [tool.flwr.app.components] (serverapp, clientapp)"
        )
    return value


def _text(table: Mapping[str, Any], key: str, path: Path, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: {where} {key} is missing or empty; Flower needs it to build the app")
    return value.strip()


def flatten(table: Mapping[str, Any], path: Path, prefix: str = "") -> dict[str, Scalar]:
    """[tool.flwr.app.config] as Flower flattens it: nested tables joined with dots."""
    out: dict[str, Scalar] = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{path}: [tool.flwr.app.config] must be a table of key = value")
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, path, full + ".")
        elif isinstance(value, (str, int, float, bool)):
            out[full] = value
        else:
            raise ConfigError(
                f"{path}: [tool.flwr.app.config] {full}: Flower's run config takes strings, numbers and "
                f"booleans (got {type(value).__name__})"
            )
    return out


def _dependencies(items: Any, path: Path) -> tuple[tuple[str, ...], str | None]:
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{path}: [project] dependencies must be a list of requirement strings")
    deps: list[str] = []
    flwr_req = None
    for text in items:
        try:
            req = Requirement(text)
        except InvalidRequirement as err:
            raise ConfigError(
                f"{path}: [project] dependencies: {text!r} is not a requirement: {err}"
            ) from err
        if req.marker is not None and not req.marker.evaluate():
            continue
        if canonicalize_name(req.name) == "flwr":
            if req.specifier and not req.specifier.contains(FLWR_VERSION, prereleases=True):
                raise ConfigError(
                    f"{path}: [project] dependencies: {text!r} excludes Flower {FLWR_VERSION}, which "
                    f"fedfleet's hosts run; widen it to admit {FLWR_VERSION} (e.g. flwr>=1.20)"
                )
            flwr_req = text  # extras (e.g. [simulation]) are for Flower's simulation engine: not needed
            continue
        deps.append(text)
    return tuple(deps), flwr_req


def run_config(app: FlowerApp, overrides: Mapping[str, Any], where: str) -> dict[str, Scalar]:
    """The app's run config with the stack's overrides (`where` names the stack key). Flower
    refuses keys the app does not declare; fedfleet also refuses a value of another type."""
    out = dict(app.config)
    for key, value in overrides.items():
        if key not in app.config:
            hint = closest(str(key), app.config) if app.config else "the app declares no run config"
            raise ConfigError(
                f"{where}.{key}: {app.pyproject} [tool.flwr.app.config] has no such key ({hint}); "
                "Flower accepts overrides only of keys the app declares"
            )
        default = app.config[key]
        finite = not isinstance(value, float) or math.isfinite(value)
        if not isinstance(value, (str, int, float, bool)) or not finite or not _same_kind(default, value):
            raise ConfigError(
                f"{where}.{key}: {value!r} is not a {type(default).__name__} like the app's default "
                f"({default!r} in {app.pyproject})"
            )
        out[key] = float(value) if isinstance(default, float) and not isinstance(value, bool) else value
    return out


def _same_kind(default: Scalar, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return type(default) is type(value)


@dataclass(frozen=True)
class NodeConfigRead:
    key: str
    file: Path  # relative to the directory scanned
    line: int
    required: bool  # read as node_config["key"] (fails without it); .get() or a guard has a default


def node_config_reads(directory: Path) -> list[NodeConfigRead]:
    """Where the code under `directory` (what the FAB holds) reads `<x>.node_config[...]` or
    `.node_config.get(...)` with a literal key. A subscript whose key the same file also tests
    (`"k" in context.node_config`) counts as guarded. A static scan: keys built at run time
    are not seen."""
    out: list[NodeConfigRead] = []
    for file in sorted(directory.rglob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # the import check names a file that does not parse, if the app uses it
        guarded = {
            node.left.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
            and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
            and any(_is_node_config(c) for c in node.comparators)
        }
        where = file.relative_to(directory)
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and _is_node_config(node.value):
                key = node.slice
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    out.append(
                        NodeConfigRead(key.value, where, node.lineno, required=key.value not in guarded)
                    )
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and _is_node_config(node.func.value)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                out.append(NodeConfigRead(node.args[0].value, where, node.lineno, required=False))
    return out


def _is_node_config(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "node_config") or (
        isinstance(node, ast.Name) and node.id == "node_config"
    )


def missing_node_config(
    reads: list[NodeConfigRead], given: Mapping[str, set[str]]
) -> list[tuple[NodeConfigRead, list[str]]]:
    """Of `reads` (node_config_reads), the keys required that some participant's SuperNode
    would not have: (the first read, the participants lacking it)."""
    out = []
    seen: set[str] = set()
    for read in reads:
        if not read.required or read.key in seen:
            continue
        seen.add(read.key)
        lacking = [p for p, keys in given.items() if read.key not in keys]
        if lacking:
            out.append((read, lacking))
    return out


def shown(requirement: str) -> str:
    """A requirement as it may be printed and recorded: credentials in a URL masked."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", requirement)


def env_key(app: FlowerApp) -> str:
    """Names the environment (local stack) or wheel cache (real hosts) for the app's
    dependencies: the same dependencies, the same one."""
    text = "\n".join(sorted(app.dependencies)) + f"\n{sys.version_info[:2]}\nflwr=={FLWR_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]
