"""The roles' public variables are declared, documented and prefixed; the playbooks lint clean."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedfleet.adapters.ansible import PLAYBOOKS
from fedfleet.core.stack import Operator, SSHSettings
from fedfleet.workflow import SERVER_RUNS

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


# --- The service account under systemd (flower_common) ----------------------------------

COMMON = PLAYBOOKS / "roles" / "flower_common"
HOME_VAR = "flower_common_home"


def _tasks(path: Path) -> list[dict]:
    """Every task of a task file, blocks flattened."""
    out: list[dict] = []
    for task in yaml.safe_load(path.read_text()) or []:
        for key in ("block", "rescue", "always"):
            out += task.get(key, [])
        if not any(key in task for key in ("block", "rescue", "always")):
            out.append(task)
    return out


def _task(path: Path, name: str) -> dict:
    return next(t for t in _tasks(path) if t["name"] == name)


def _module(task: dict) -> str:
    return next(key for key in task if key.startswith("ansible."))


def test_the_service_account_is_not_the_default_ssh_user():
    """Under systemd the role makes flower_common_user a nologin system account homed in
    flower_common_home: the user fedfleet logs in as must be another one."""
    defaults = yaml.safe_load((COMMON / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((COMMON / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"][
        "options"
    ]
    logins = {SSHSettings.user, Operator.admin_user}
    for name in ("flower_common_user", "flower_common_group"):
        assert defaults[name] not in logins, f"{name} defaults to the SSH login user {defaults[name]!r}"
        assert specs[name]["default"] == defaults[name], f"{name}: argument_specs and defaults differ"
        assert f"| `{name}` | `{defaults[name]}` |" in (COMMON / "README.md").read_text()


def test_the_preflight_refuses_the_login_user_as_service_account_before_anything_changes():
    main = [t["name"] for t in _tasks(COMMON / "tasks" / "main.yml")]
    assert main[0] == "Check the shared inputs before changing anything"
    check = _task(
        COMMON / "tasks" / "preflight.yml",
        "Check that the service account is not the user Ansible logs in as",
    )
    assert check["ansible.builtin.assert"]["that"] == ["flower_common_user != _flower_common_login_user"]
    assert "flower_common_create_user" in check["when"]
    message = check["ansible.builtin.assert"]["fail_msg"]
    assert "flower_common_user" in message and "ansible_user" in message
    login = yaml.safe_load((COMMON / "vars" / "main.yml").read_text())["_flower_common_login_user"]
    assert "ansible_user" in login and "ansible_ssh_user" in login and "DEFAULT_REMOTE_USER" in login


def _run_preflight(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    playbook = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists():
        pytest.skip("ansible-playbook is not installed in this environment (make setup installs it)")
    (tmp_path / "inventory.ini").write_text(
        f"host ansible_connection=local ansible_user={SSHSettings.user} ansible_python_interpreter={sys.executable}\n"
    )
    (tmp_path / "play.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Preflight",
                    "hosts": "host",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Run the shared preflight",
                            "ansible.builtin.include_role": {
                                "name": "flower_common",
                                "tasks_from": "preflight",
                            },
                        }
                    ],
                }
            ]
        )
    )
    variables = {
        "flower_common_service_manager": "systemd",
        "flower_common_become": False,  # no sudo here; the read's become is checked on its own
        "flower_common_venv": str(tmp_path / "home" / "venv"),
        "flower_common_install_min_free_mib": 0,
    }
    return subprocess.run(
        [str(playbook), "-i", "inventory.ini", "play.yml", "-e", json.dumps(variables), *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": f"{playbook.parent}:/usr/bin:/bin",
            "HOME": str(Path.home()),
            "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
        },
        check=False,
    )


def test_the_preflight_passes_with_the_default_service_account(tmp_path: Path):
    done = _run_preflight(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_preflight_fails_when_the_service_account_is_the_login_user(tmp_path: Path):
    done = _run_preflight(tmp_path, "-e", f"flower_common_user={SSHSettings.user}")
    assert done.returncode != 0
    assert f"flower_common_user ({SSHSettings.user}) is the user Ansible logs in as" in done.stdout
    assert "Check that the service account is not the user Ansible logs in as" in done.stdout


# --- Reads inside the home (0700, the service account's under systemd) --------------------

READ_TASK = "Read the host's Python version and the free disk for the install"


def test_the_preflight_read_of_python_and_disk_runs_with_become():
    task = _task(COMMON / "tasks" / "preflight.yml", READ_TASK)
    assert task["become"] == "{{ flower_common_become }}"


def test_the_preflight_read_answers_for_a_home_the_user_cannot_search(tmp_path: Path):
    """Path.is_dir() raises PermissionError up to Python 3.12; the read must answer instead."""
    argv = _task(COMMON / "tasks" / "preflight.yml", READ_TASK)["ansible.builtin.command"]["argv"]
    assert argv[1] == "-c"
    home = tmp_path / "home"
    (home / "venv").mkdir(parents=True)
    home.chmod(0o700)
    if os.geteuid() == 0:
        # root searches everything: read as nobody, with the system's Python (not under /root).
        python = Path("/usr/bin/python3")
        if not python.exists():
            pytest.skip("no /usr/bin/python3 to run as an unprivileged user")
        as_user: dict[str, Any] = {"user": 65534, "group": 65534, "extra_groups": []}
    else:
        python = Path(sys.executable)
        home.chmod(0o000)
        as_user = {}
    try:
        done = subprocess.run(
            [str(python), "-c", argv[2], str(home / "venv" / "lib")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
            **as_user,
        )
    finally:
        home.chmod(0o700)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["tag"].startswith("cp3") and found["free_mib"] >= 0 and "error" not in found
    assert (home / "venv").is_relative_to(found["path"]) and os.path.isdir(found["path"])


def _home_vars() -> set[str]:
    """Variables (any role's defaults or vars) naming a path in the fedfleet home."""
    values: dict[str, str] = {}
    for role in ROLES:
        for part in ("defaults", "vars"):
            for name, value in (yaml.safe_load((role / part / "main.yml").read_text()) or {}).items():
                values[name] = yaml.safe_dump(value)
    found = {HOME_VAR} | {n for n, v in values.items() if "/opt/fedfleet" in v}
    while True:
        more = {n for n, v in values.items() if any(re.search(rf"\b{f}\b", v) for f in found)} - found
        if not more:
            return found
        found |= more


def test_every_task_that_touches_the_home_on_the_host_uses_become():
    """Under systemd the home is 0700 and the service account's, and Ansible logs in as another
    user: a task that reads or writes there without sudo fails. Exempt: the supervisor's own
    files (that path runs as the home's owner), network namespaces (supervisor only) and
    tasks run on the controller."""
    names = _home_vars()
    local = (
        "ansible.builtin.assert",
        "ansible.builtin.debug",
        "ansible.builtin.meta",
        "ansible.builtin.set_fact",
    )
    missing = []
    for role in ROLES:
        for path in sorted([*(role / "tasks").glob("*.yml"), *(role / "handlers").glob("*.yml")]):
            for task in _tasks(path):
                module = _module(task)
                if module in local or "include" in module or "import" in module:
                    continue
                args = yaml.safe_dump(task[module])
                when = yaml.safe_dump(task.get("when", ""))
                if (
                    task.get("delegate_to") == "localhost"
                    or "_flower_common_supervisor" in args
                    or "'supervisor'" in when
                    or "flower_common_netns | length > 0" in when
                ):
                    continue
                touches_home = any(re.search(rf"\b{n}\b", args) for n in names)
                if touches_home and task.get("become") != "{{ flower_common_become }}":
                    missing.append(f"{path.relative_to(PLAYBOOKS)}: {task['name']}")
    assert not missing, "tasks inside the home without become: " + ", ".join(missing)


# --- The SuperLink's run outputs (flower_superlink) ----------------------------------------


def test_the_superlink_creates_the_runs_directory_for_the_service_account():
    """The ServerApp (the service account under systemd) writes under <home>/runs/<run-id>."""
    meta = yaml.safe_load((PLAYBOOKS / "roles" / "flower_superlink" / "meta" / "main.yml").read_text())
    common = next(d for d in meta["dependencies"] if d["role"] == "flower_common")
    assert f"{{{{ {HOME_VAR} }}}}/{SERVER_RUNS}" in common["vars"]["flower_common_role_dirs"]
    create = _task(COMMON / "tasks" / "directories.yml", "Create the directories this host needs")
    assert "flower_common_role_dirs" in create["loop"]
    assert (
        create["ansible.builtin.file"]["owner"]
        == "{{ flower_common_user if flower_common_create_user else omit }}"
    )
    assert create["become"] == "{{ flower_common_become }}"


# --- The systemd units (real hosts with systemd; none runs here) ----------------------------

SYSTEMD_UNITS = {
    "flower_superlink": ("flower-superlink.service", "flower-proxy.service"),
    "flower_supernode": ("flower-supernode.service", "fedfleet-worker.service"),
}


def test_every_systemd_unit_the_roles_write_passes_systemd_analyze_verify(tmp_path: Path):
    """The units as the roles render them for a systemd host (the roles' own defaults and
    variables, through Ansible's template module) are valid to systemd itself: no unknown
    key, no unresolvable specifier, every ExecStart program there. (The systemd path runs
    on real hosts only: this machine's CI has no systemd as PID 1.)"""
    playbook = Path(sys.executable).with_name("ansible-playbook")
    analyze = Path("/usr/bin/systemd-analyze")
    nginx = Path("/usr/sbin/nginx")
    if not playbook.exists() or not analyze.exists() or not nginx.exists():
        pytest.skip(
            "needs ansible-playbook (make setup), nginx (make setup as root) and systemd-analyze (systemd)"
        )
    units = tmp_path / "units"
    units.mkdir()
    files = [
        PLAYBOOKS / "roles" / role / f
        for role in ("flower_common", *SYSTEMD_UNITS)
        for f in ("defaults/main.yml", "vars/main.yml")
    ]
    templates = [
        {"src": str(PLAYBOOKS / "roles" / role / "templates" / f"{unit}.j2"), "dest": str(units / unit)}
        for role, names in SYSTEMD_UNITS.items()
        for unit in names
    ]
    tasks: list[dict[str, Any]] = [
        {"name": f"Load {f.parent.parent.name} {f.parent.name}", "ansible.builtin.include_vars": str(f)}
        for f in files
    ]
    tasks.append({"name": "Render", "ansible.builtin.template": "src={{ item.src }} dest={{ item.dest }}",
                  "loop": templates})  # fmt: skip
    (tmp_path / "play.yml").write_text(
        yaml.safe_dump([{"name": "Units", "hosts": "host", "gather_facts": False, "tasks": tasks}])
    )
    (tmp_path / "inventory.ini").write_text(
        f"host ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    home = tmp_path / "home"
    variables = {
        "flower_common_service_manager": "systemd",
        "flower_common_home": str(home),
        "flower_common_venv": str(Path(sys.executable).parent.parent),
        "flower_superlink_proxy_binary": str(nginx),
        "flower_superlink_tls_src": str(tmp_path / "pki"),
        "flower_supernode_superlink": "203.0.113.10:9443",
        "flower_supernode_name": "hospital-eu",
        "flower_supernode_app_src": str(tmp_path / "app.tar"),
    }
    done = subprocess.run(
        [str(playbook), "-i", "inventory.ini", "play.yml", "-e", json.dumps(variables)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": f"{playbook.parent}:/usr/bin:/bin", "HOME": str(Path.home()),
             "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rendered = sorted(units.iterdir())
    assert [p.name for p in rendered] == sorted(u for names in SYSTEMD_UNITS.values() for u in names)
    proxy = (units / "flower-proxy.service").read_text()
    assert f"ExecStart={nginx} -p {home}/superlink/proxy/ -c {home}/superlink/proxy/nginx.conf" in proxy
    checked = subprocess.run(
        [str(analyze), "verify", "--man=no", *map(str, rendered)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    said = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    assert checked.returncode == 0 and said == [], said


def test_the_stop_waits_for_what_a_service_left_then_kills_the_rest(tmp_path: Path):
    """`tasks_from: stop` with `flower_common_stop_leftovers`: a process that follows its parent
    out on its own (as Flower's SuperExec and ServerApp do) is waited for; one that does not is
    killed once the wait is over. Nothing matching is left when the play returns."""
    import signal
    import time

    playbook = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists():
        pytest.skip("ansible-playbook is not installed in this environment (make setup installs it)")
    leaving, staying = (f"--runtime-api-address 127.0.0.1:{p}" for p in (21001, 21002))
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep({seconds})", *flags.split()],
            start_new_session=True,
        )
        for name, seconds, flags in (("leaving", 2.5, leaving), ("staying", 600, staying))
    }
    (tmp_path / "inventory.ini").write_text(
        f"host ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    task = {"ansible.builtin.include_role": {"name": "flower_common", "tasks_from": "stop"}, "name": "Stop"}
    (tmp_path / "play.yml").write_text(
        yaml.safe_dump([{"name": "Stop", "hosts": "host", "gather_facts": False, "tasks": [task]}])
    )
    variables = {
        "flower_common_service_manager": "supervisor",
        "flower_common_home": str(tmp_path / "home"),  # no supervisor there: nothing else to stop
        "flower_common_venv": str(Path(sys.executable).parent.parent),
        "flower_common_services": [],
        "flower_common_become": False,
        "flower_common_stop_wait": 4,
        # as stop.yml writes them: the port ends the match (21001 must not match 210010)
        "flower_common_stop_leftovers": [f"{p}( |$)" for p in (leaving, staying)],
    }
    started = time.monotonic()
    try:
        # (ansible-playbook takes about a second to start: "leaving" is still there when the
        # stop first looks, so it is waited for, not merely found gone)
        done = subprocess.run(
            [str(playbook), "-i", "inventory.ini", "play.yml", "-e", json.dumps(variables)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": f"{playbook.parent}:/usr/bin:/bin", "HOME": str(Path.home()),
                 "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
                 "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"},
        )  # fmt: skip
        took = time.monotonic() - started
        codes = {name: proc.poll() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert codes == {"leaving": 0, "staying": -signal.SIGKILL}, (codes, done.stdout[-2000:])
    assert took >= 4, took  # the wait ran its course for the one that stayed
