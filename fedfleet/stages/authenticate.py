"""Authenticate: cloud credentials checked with the cloud before anything uses them.

`add` reads a provider's file (`core.credentials`), asks the cloud who it is
(`adapters.cloudauth`) and only then stores it; `for_clouds` gives `fedfleet
preview|up|destroy` the verified credentials of each cloud a stack uses, as the environment
variables Pulumi's providers read, for that Pulumi run only.

The store is a directory outside every repository, owner-only (0700; each credential a
0600 JSON file named after it): `$FEDFLEET_CREDENTIALS_DIR`, else
`$XDG_CONFIG_HOME/fedfleet/credentials`, else `~/.config/fedfleet/credentials`. Nothing
here prints, logs or returns a secret: listings carry the identity the cloud confirmed and
a masked key id.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfleet.adapters import cloudauth
from fedfleet.core.credentials import (
    ENV_HINT,
    NAME_RE,
    WHERE,
    Credential,
    check_name,
    default_name,
    from_environment,
    read_file,
)
from fedfleet.core.errors import ConfigError, CredentialError
from fedfleet.core.util import closest

STORE_ENV = "FEDFLEET_CREDENTIALS_DIR"
MAX_FILE = 1 << 20  # the providers' files are a few KB

Verifier = Callable[[Credential, Mapping[str, str]], dict[str, str]]


def store_dir(environ: Mapping[str, str]) -> Path:
    if environ.get(STORE_ENV):
        return Path(environ[STORE_ENV]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "fedfleet" / "credentials"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Stored:
    name: str
    credential: Credential
    meta: dict[str, Any]  # cloud, identity, masked_key_id, added, last_verified, last_result

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, **self.meta}


class Store:
    """The owner-only directory of stored credentials."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        repo = _repository_of(self.root)
        # a repository of dotfiles rooted at the home directory adds files one by one: allowed
        if repo is not None and repo != Path.home().resolve():
            raise ConfigError(
                f"{STORE_ENV}={root}: the credential store must not be inside a repository ({repo} is "
                "one), where a commit could publish it; point it outside (default ~/.config/fedfleet/credentials)"
            )

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.root.stat().st_mode & 0o077:
            os.chmod(self.root, 0o700)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One change to the store at a time (an `auth verify` and an `auth remove` at once must
        not bring a removed key back)."""
        self._open()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self, name: str) -> Stored:
        path = self.path(name)
        if not NAME_RE.match(name) or not path.is_file():
            known = self.names()
            raise ConfigError(
                f"no stored credential named {name!r} ({self.root}); "
                f"{closest(name, known) if known else 'none is stored: `fedfleet auth add CLOUD --file FILE`'}"
            )
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} can be read by others: `chmod 600 {path}` (and check who read it)")
        try:
            data = json.loads(path.read_text())
            credential = Credential.from_store(data, str(path))
            meta = {
                k: data[k]
                for k in ("cloud", "identity", "masked_key_id", "added", "last_verified", "last_result")
            }
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{path} is not a fedfleet credential ({type(err).__name__}); `fedfleet auth remove {name}` and add "
                "it again"
            ) from None
        return Stored(name, credential, meta)

    def create(self, name: str, credential: Credential, meta: dict[str, Any]) -> Path:
        """Store a new credential, 0600 from its first byte; refuse a name that exists (also
        one stored at the same moment by another command)."""
        path = self.path(name)
        with self._locked():
            tmp = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
            self._write(tmp, {**meta, **credential.to_store()})
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _duplicate(name, self.root) from None
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def update(self, stored: Stored, meta: dict[str, Any]) -> bool:
        """Record a check's result, unless the credential was removed or replaced meanwhile."""
        with self._locked():
            try:
                now = self.load(stored.name)
            except ConfigError:
                return False
            if (now.credential.public, now.credential.secret) != (
                stored.credential.public,
                stored.credential.secret,
            ):
                return False
            tmp = self.root / f".{stored.name}.{secrets.token_hex(4)}.tmp"
            self._write(tmp, {**meta, **stored.credential.to_store()})
            os.replace(tmp, self.path(stored.name))
            return True

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> Stored:
        with self._locked():
            stored = self.load(name)
            self.path(name).unlink()
        return stored


def _duplicate(name: str, root: Path) -> ConfigError:
    return ConfigError(
        f"a credential named {name!r} is stored already ({root}); pass --name OTHER, or `fedfleet auth remove "
        f"{name}` first to replace it"
    )


def _repository_of(path: Path) -> Path | None:
    for parent in (path, *path.parents):
        if (parent / ".git").exists():
            return parent
    return None


# -- fedfleet auth add | list | verify | remove ----------------------------------------------


def read(path: Path) -> str:
    """A credential file's text, or ConfigError saying why it cannot be read."""
    try:
        if path.is_dir():
            raise ConfigError(f"--file {path}: is a directory; give the credential file itself")
        if path.stat().st_size > MAX_FILE:
            raise ConfigError(
                f"--file {path}: {path.stat().st_size} bytes is not a credential file (a few KB)"
            )
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"--file {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"--file {path}: not readable by this user (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"--file {path}: not a text file; expected a CSV, INI or JSON credential file"
        ) from None
    except OSError as err:
        raise ConfigError(f"--file {path}: cannot be read ({err.strerror})") from None


def add(
    store: Store,
    cloud: str,
    file: Path,
    environ: Mapping[str, str],
    *,
    name: str | None = None,
    profile: str | None = None,
    subscription: str | None = None,
    verify: Verifier = cloudauth.verify,
    confirm: Callable[[str, dict[str, str]], bool] = lambda name, identity: True,
) -> dict[str, Any]:
    """Read, verify, show (`confirm(name, identity)`: False stores nothing), then store.
    Nothing is stored unless the cloud accepted the credential."""
    if name is not None:
        check_name(name)
        if store.path(name).exists():
            raise _duplicate(name, store.root)
    credential = read_file(cloud, read(file), str(file), profile=profile, subscription=subscription)
    identity = verify(credential, environ)
    name = name or default_name(cloud, identity)
    if store.path(name).exists():
        raise _duplicate(name, store.root)
    if not confirm(name, identity):
        return {"name": name, "cloud": cloud, "identity": identity, "stored": None}
    now = _now()
    meta = {
        "cloud": cloud, "identity": identity, "masked_key_id": credential.masked_key_id(),
        "added": now, "last_verified": now, "last_result": "ok",
    }  # fmt: skip
    path = store.create(name, credential, meta)
    return {"name": name, **meta, "stored": str(path)}


def listing(store: Store) -> list[dict[str, Any]]:
    return [store.load(name).summary() for name in store.names()]


def verify_stored(
    store: Store, names: Iterable[str] | None, environ: Mapping[str, str], verify: Verifier = cloudauth.verify
) -> list[dict[str, Any]]:
    """Check each named credential (all, without names) again; record when and how it went."""
    results = []
    for name in list(names) if names else store.names():
        stored = store.load(name)
        meta = dict(stored.meta)
        try:
            meta["identity"] = verify(stored.credential, environ)
            meta["last_result"] = "ok"
            error = None
        except CredentialError as err:
            meta["last_result"], error = err.reason, str(err)
        meta["last_verified"] = _now()
        recorded = store.update(stored, meta)  # False: removed or replaced meanwhile
        results.append({"name": name, **meta, "ok": error is None, "error": error, "recorded": recorded})
    return results


# -- what fedfleet preview | up | destroy hand to Pulumi ------------------------------------


def for_clouds(
    store: Store,
    clouds: Iterable[str],
    named: Mapping[str, str],
    environ: Mapping[str, str],
    stack_file: Path,
    verify: Verifier = cloudauth.verify,
) -> tuple[dict[str, str], list[str]]:
    """The environment Pulumi gets for the clouds a stack uses (every credential verified
    now) and a line per cloud saying which credential and identity; or an error naming the
    cloud and the command that fixes it.

    Per cloud: the stored credential `fedfleet:credentials.<cloud>` names; else static
    credentials in `environ` (CI); else the only stored credential for the cloud."""
    chosen: dict[str, tuple[Credential, str, Stored | None]] = {}
    missing = []
    for cloud in sorted(clouds):
        try:
            chosen[cloud] = _choose(store, cloud, named.get(cloud), environ, stack_file)
        except CredentialError as err:
            missing.append(str(err))
    if missing:  # every cloud that lacks one, at once
        raise CredentialError("\n".join(missing), "missing")
    env: dict[str, str] = {}
    used = []
    for cloud, (credential, label, stored) in chosen.items():
        try:
            identity = verify(credential, environ)
        except CredentialError as err:
            if stored is not None:
                store.update(stored, {**stored.meta, "last_verified": _now(), "last_result": err.reason})
            fix = (
                f"`fedfleet auth add {cloud} --file FILE --name NEW` with a new key, then set "
                f"fedfleet:credentials.{cloud}: NEW in {stack_file}"
                if label.startswith("stored")
                else f"update {ENV_HINT[cloud]} in the environment, or unset them and `fedfleet auth add {cloud} "
                "--file FILE`"
            )
            raise CredentialError(
                f"{cloud} ({label}) no longer verifies: {err}. Fix: {fix}", err.reason
            ) from None
        if stored is not None:
            store.update(
                stored, {**stored.meta, "identity": identity, "last_verified": _now(), "last_result": "ok"}
            )
        env.update(credential.pulumi_env())
        used.append(f"{cloud}: {label}, verified: {who(cloud, identity)}")
    return env, used


def _choose(
    store: Store, cloud: str, name: str | None, environ: Mapping[str, str], stack_file: Path
) -> tuple[Credential, str, Stored | None]:
    if name:
        stored = store.load(name)
        if stored.credential.cloud != cloud:
            raise ConfigError(
                f"{stack_file}: fedfleet:credentials.{cloud}: {name!r} is a {stored.credential.cloud} credential; "
                f"name a {cloud} one (`fedfleet auth list`)"
            )
        return stored.credential, f"stored credential {name!r}", stored
    mine = [s for s in (store.load(n) for n in store.names()) if s.credential.cloud == cloud]
    try:
        found = from_environment(cloud, environ, lambda p: Path(p).expanduser().read_text())
    except ConfigError as err:
        if len(mine) != 1:
            raise
        # partial or foreign settings in the environment (ARM_SUBSCRIPTION_ID alone after `az login`, a
        # gcloud user login): the one stored credential is the one meant
        found, skipped = None, f"; the environment's {cloud} settings were not used: {err}"
    else:
        skipped = ""
    if found is not None:
        return found, f"credentials from {found.source}", None
    if len(mine) == 1:
        return mine[0].credential, f"stored credential {mine[0].name!r}{skipped}", mine[0]
    if not mine:
        raise CredentialError(
            f"{cloud}: the stack uses {cloud}, and no credential for it is stored or in the environment; add one: "
            f"`fedfleet auth add {cloud} --file FILE` ({WHERE[cloud]}), or set {ENV_HINT[cloud]}",
            "missing",
        )
    mine_names = [s.name for s in mine]
    raise ConfigError(
        f"{stack_file}: {len(mine)} {cloud} credentials are stored ({', '.join(mine_names)}); say which this stack uses: "
        f"fedfleet:credentials: {{{cloud}: NAME}}"
    )


def who(cloud: str, identity: Mapping[str, str], *, short: bool = False) -> str:
    """Who a credential is, in a line (or a few words, for tables)."""
    i = {k: str(v) for k, v in identity.items()}
    arn, email, sub = i.get("arn", ""), i.get("client_email", ""), i.get("subscription_id", "")
    long_form, short_form = {
        "aws": (f"account {i.get('account')} as {arn}", f"{i.get('account')} {arn.rsplit(':', 1)[-1]}"),
        "gcp": (f"project {i.get('project_id')} as {email}", f"{i.get('project_id')} {email.split('@')[0]}@"),
        "azure": (
            f"subscription {i.get('subscription_name')} ({sub}), tenant {i.get('tenant_id')}",
            f"{i.get('subscription_name')} ({sub[:8]}…)",
        ),
    }[cloud]
    return short_form if short else long_form
