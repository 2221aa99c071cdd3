"""scripts/install: install, re-run, upgrade and uninstall into a staging --root.

One module-scoped sequence, because each step starts from the state the one before left (a
real machine's life): install from a checkout -> the same again (nothing changes) -> upgrade
to a newer wheel from `python -m build` (what `make dist` runs) -> uninstall -> purge. The
checkout is a snapshot copy (other work edits the tree while the test runs) and the
dependencies come from a wheelhouse downloaded once (pip's cache makes that a copy), so the
installer's pip runs with --no-index. About 60 s in all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import cli
from common.config import load

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_SKIP = shutil.ignore_patterns(".git", ".venv", ".run", ".cache", "build", "dist",
                                       "*.egg-info", "__pycache__", "*_cache")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
NEWER = VERSION + ".post1"  # a later version that any version string takes


def system_python() -> str:
    """The interpreter an operator's `sudo scripts/install` runs: /usr/bin/python3."""
    for candidate in ("/usr/bin/python3", sys.executable):
        probe = subprocess.run([candidate, "-c", "import ensurepip, venv, sys; "
                                "assert sys.version_info >= (3, 11)"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python >= 3.11 with venv and ensurepip")


def tree(path: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``path``: type, mode, size, mtime, link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            entry = Path(dirpath, name)
            st = entry.lstat()
            link = os.readlink(entry) if entry.is_symlink() else None
            out[str(entry.relative_to(path))] = (st.st_mode, st.st_size, st.st_mtime_ns, link)
    return out


def site_packages(python: str) -> list[Path]:
    code = ("import site, sysconfig; print('\\n'.join({*site.getsitepackages(), "
            "sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return [Path(p) for p in out.stdout.split() if Path(p).is_dir()]


@dataclass
class Stage:
    tmp: Path
    root: Path  # the machine: --root
    source: Path  # the checkout
    python: str
    env: dict[str, str]

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.python, str(self.source / "scripts" / "install"), "--root", str(self.root),
             *args], capture_output=True, text=True, env=self.env, timeout=300, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def run(self, command: str, *args: str) -> str:
        result = subprocess.run([str(self.at("/usr/local/bin") / command), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=SNAPSHOT_SKIP, symlinks=True)
    wheelhouse = tmp / "wheelhouse"
    deps = tomllib.loads((source / "pyproject.toml").read_text())["project"]["dependencies"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                    "--disable-pip-version-check", "-d", str(wheelhouse),
                    "-c", str(source / "scripts" / "constraints.txt"),
                    *deps, "setuptools>=77"], check=True, timeout=240)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "AIVMM_"))}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    root = tmp / "root"
    # What systemd-analyze verify --root needs of the host besides our files: the targets the
    # units name and /bin/kill (the agent's ExecReload).
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "bin" / "kill")
    yield Stage(tmp, root, source, system_python(), env)


@pytest.fixture(scope="module")
def system_site(stage: Stage) -> Iterator[None]:
    """The system interpreters' site-packages, before the first install and after the last."""
    pythons = {stage.python} | ({"/usr/bin/python3"} if Path("/usr/bin/python3").exists()
                                else set())
    dirs = sorted({d for p in pythons for d in site_packages(p)})
    before = {d: tree(d) for d in dirs}
    yield
    assert {d: tree(d) for d in dirs} == before, "scripts/install modified the system Python"


def test_install_from_the_checkout(stage: Stage, system_site: None) -> None:
    out = stage.install().stdout
    current = stage.at("/opt/aivmm/current")
    env = current.resolve()
    assert env.parent == stage.at("/opt/aivmm/envs") and env.name.startswith(
        f"aivmm-{VERSION}-")
    for command in ("aivmm-agent", "aivmm-scheduler", "aivmmctl"):
        # Runs from the new environment, not from this test's .venv.
        line = stage.run(command, "--version")
        assert line.startswith(f"{command} {VERSION} (python ") and line.endswith(f", {env})\n")
        assert (stage.at("/usr/local/bin") / command).resolve() == env / "bin" / command
    assert "sudo systemctl enable --now aivmm-agent aivmm-scheduler" in out
    assert "sudoedit /etc/aivmm/agent.toml" in out
    for name in ("agent", "scheduler"):
        example = (stage.source / "deploy" / "aivmm" / f"{name}.toml").read_text()
        assert stage.at(f"/etc/aivmm/{name}.toml").read_text() == example
        assert stage.at(f"/etc/aivmm/{name}.toml.example").read_text() == example
        assert stage.at(f"/usr/local/lib/systemd/system/aivmm-{name}.service").read_text() \
            == (stage.source / "systemd" / f"aivmm-{name}.service").read_text()
    assert stage.at("/var/lib/aivmm/models").is_dir()
    assert not (stage.source / "build").exists()  # the wheel was built from a copy


def test_installed_units_verify_against_the_installed_commands(stage: Stage) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze not found: scripts/install-services installs it")
    units = sorted(str(p) for p in stage.at("/usr/local/lib/systemd/system").glob("*.service"))
    assert len(units) == 2
    result = subprocess.run([binary, "verify", "--man=no", f"--root={stage.root}", *units],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    # And verify does look at the installed command: without it, it fails.
    link = stage.at("/usr/local/bin/aivmm-agent")
    target = os.readlink(link)
    link.unlink()
    try:
        broken = subprocess.run([binary, "verify", "--man=no", f"--root={stage.root}",
                                 *units], capture_output=True, text=True, timeout=60,
                                check=False)
        assert broken.returncode != 0 and "aivmm-agent" in broken.stderr
    finally:
        link.symlink_to(target)


def test_a_second_run_changes_nothing(stage: Stage) -> None:
    # The operator has edited the config since: it stays.
    config = stage.at("/etc/aivmm/agent.toml")
    config.write_text(config.read_text().replace('advertise_host = "127.0.0.1"',
                                                 'advertise_host = "10.0.0.5"'))
    before = tree(stage.root)
    out = stage.install().stdout
    assert tree(stage.root) == before
    assert "nothing changed" in out


def test_upgrade_to_a_newer_wheel_switches_the_environment(stage: Stage) -> None:
    newer = stage.tmp / "newer"
    shutil.copytree(stage.source, newer, symlinks=True)
    pyproject = newer / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'version = "{VERSION}"',
                                                       f'version = "{NEWER}"', 1))
    dist = stage.tmp / "dist"
    subprocess.run([sys.executable, "-m", "build", "-q", "--outdir", str(dist), str(newer)],
                   env=stage.env, check=True, capture_output=True, timeout=240)
    wheel = dist / f"aivmm-{NEWER}-py3-none-any.whl"
    sdist = dist / f"aivmm-{NEWER}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    assert {f"aivmm-{NEWER}/pyproject.toml", f"aivmm-{NEWER}/agent/main.py"} <= names

    old = stage.at("/opt/aivmm/current").resolve()
    out = stage.install("--wheel", str(wheel)).stdout
    new = stage.at("/opt/aivmm/current").resolve()
    assert new != old and new.name.startswith(f"aivmm-{NEWER}-")
    assert stage.run("aivmm-agent", "--version").startswith(f"aivmm-agent {NEWER} ")
    assert stage.run("aivmmctl", "--version").startswith(f"aivmmctl {NEWER} ")
    # The old environment stays while a process may still run from it.
    assert stage.at("/opt/aivmm/previous").resolve() == old and old.is_dir()
    assert "systemctl try-restart" in out
    assert 'advertise_host = "10.0.0.5"' in stage.at("/etc/aivmm/agent.toml").read_text()
    # The same wheel again: nothing changes.
    before = tree(stage.root)
    stage.install("--wheel", str(wheel))
    assert tree(stage.root) == before


def test_uninstall_keeps_the_config_and_purge_removes_it(stage: Stage) -> None:
    stage.install("--uninstall")
    assert not stage.at("/opt/aivmm").exists()
    for command in ("aivmm-agent", "aivmm-scheduler", "aivmmctl"):
        assert not os.path.lexists(stage.at("/usr/local/bin") / command)
    assert not list(stage.at("/usr/local/lib/systemd/system").glob("aivmm-*"))
    assert 'advertise_host = "10.0.0.5"' in stage.at("/etc/aivmm/agent.toml").read_text()
    assert stage.at("/var/lib/aivmm/models").is_dir()
    stage.install("--uninstall", "--purge")
    assert not stage.at("/etc/aivmm").exists() and not stage.at("/var/lib/aivmm/models").exists()


def test_the_installer_never_breaks_system_packages() -> None:
    text = (ROOT / "scripts" / "install").read_text()
    assert "break-system-packages" not in text and "--user" not in text


@pytest.mark.parametrize("name", ["agent", "scheduler"])
def test_example_configs_load(name: str) -> None:
    from agent.config import AgentConfig
    from scheduler.config import SchedulerConfig

    cls = AgentConfig if name == "agent" else SchedulerConfig
    config = load(cls, ROOT / "deploy" / "aivmm" / f"{name}.toml", explicit=True, environ={})
    assert config.etcd == ["http://127.0.0.1:2379"]


def test_version_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from ctl.main import parser

    for p in (cli.daemon_parser("aivmm-agent", "/etc/aivmm/agent.toml", ""), parser()):
        with pytest.raises(SystemExit) as exit_:
            p.parse_args(["--version"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.split()[1] == VERSION and sys.prefix in out
