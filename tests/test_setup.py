"""The Makefile's front doors: .venv on a fresh machine, or an environment the user
already has (a Conda or virtual environment with PyTorch) used as it is. The prepared
environment here is a real virtual environment that sees this suite's packages through
a .pth file: it satisfies requirements.txt without installing anything."""
import os
import shutil
import site
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_env(folder, with_packages):
    """A virtual environment at folder; with_packages: it sees this Python's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    if with_packages:
        (lib,) = (folder / "lib").iterdir()
        (lib / "site-packages" / "suite.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n")
    return folder


def repo_copy(folder):
    """The files the set-up targets read, in a folder of their own (no .venv there)."""
    folder.mkdir()
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(os.path.join(REPO, name), folder / name)
    for name in ("tools", "code"):
        shutil.copytree(os.path.join(REPO, name), folder / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def run_make(repo, env_dir, *targets):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}")
    return subprocess.run(["make", "-s", "-C", str(repo)] + list(targets), env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_an_activated_environment_with_the_requirements_is_used_as_it_is(tmp_path):
    env_dir = make_env(tmp_path / "conda_like", with_packages=True)
    repo = repo_copy(tmp_path / "repo")
    done = run_make(repo, env_dir, "data/demo/train.txt")
    assert done.returncode == 0, done.stderr
    # it says which Python and torch, and that Python built the demo set
    assert f"=> environment: {env_dir / 'bin' / 'python3'}" in done.stdout, done.stdout
    assert "torch 2." in done.stdout
    assert (repo / "data" / "demo" / "train.txt").is_file()
    assert not (repo / ".venv").exists()          # nothing created, nothing installed


def test_an_environment_without_them_is_refused_in_one_line(tmp_path):
    env_dir = make_env(tmp_path / "bare", with_packages=False)
    repo = repo_copy(tmp_path / "repo")
    done = run_make(repo, env_dir, "demo", "USE_ACTIVE_ENV=1")
    assert done.returncode != 0
    error = next(l for l in done.stderr.splitlines() if "check_env.py: error" in l)
    assert "torch: not installed" in error and "pip install -r requirements.txt" in error
    assert not (repo / ".venv").exists() and not (repo / "data").exists()
