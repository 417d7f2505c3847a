"""What ``python -m build`` makes is what a user can trust.

The wheel carries the package, its ``py.typed`` and the licence, and installs
without extras into a fresh virtual environment; the sdist is the whole
project, so that unpacking it and running its tests works.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIST = "pht_tunnel"  # the distribution name normalised, as in file names


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def project_files(folder: str) -> set[str]:
    """Files under ``folder`` of the checkout that belong in a distribution."""
    return {
        str(path.relative_to(ROOT))
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.fail("the 'build' package is missing: pip install -r requirements-dev.txt")
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy: an in-tree build leaves build/ and *.egg-info behind.
    source = tmp_path_factory.mktemp("source") / "project"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache"
        ),
    )
    run(sys.executable, "-m", "build", "--outdir", out, source)
    return out


def only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_wheel_contents_and_metadata(dist: Path) -> None:
    wheel = zipfile.ZipFile(only(dist, f"{DIST}-*.whl"))
    names = set(wheel.namelist())
    package = {f for f in project_files("pht") if f.endswith((".py", "py.typed"))}
    assert package <= names, package - names
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]
    metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert metadata["Name"] == "pht-tunnel"
    assert metadata["License-Expression"] == "MIT"
    requires = metadata.get_all("Requires-Dist") or []
    assert "pybase64>=1.3" in requires  # the fast path is the default install
    assert any(r.startswith("h11") and "<" in r for r in requires)
    assert any(r.startswith("pyyaml") and 'extra == "cli"' in r for r in requires)
    # The long description is the README, which links to nothing the wheel lacks.
    description = str(metadata.get_payload())
    assert "](" not in description.replace("](https://", "")


def test_sdist_is_the_whole_project(dist: Path) -> None:
    sdist = only(dist, f"{DIST}-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    wanted = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml"}
    wanted |= {"requirements-dev.txt", "requirements-docs.txt"}
    for folder in ("pht", "tests", "docs", "benchmarks", "scripts"):
        wanted |= project_files(folder)
    wanted = {w for w in wanted if not w.startswith("benchmarks/results")}
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if n.startswith(".venv") or "__pycache__" in n]


def test_unpacked_sdist_runs_its_tests(dist: Path, tmp_path: Path) -> None:
    with tarfile.open(only(dist, f"{DIST}-*.tar.gz")) as tar:
        tar.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    pytest_args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    # Every test module imports (a collection error is exit code 2).
    run(*pytest_args, "--collect-only", cwd=unpacked, env=env)
    # The tests run against the unpacked copy of pht, with its golden transcripts.
    out = run(
        *pytest_args,
        "tests/test_conformance_client.py",
        "tests/test_conformance_server.py",
        "tests/test_core.py",
        cwd=unpacked,
        env=env,
    )
    assert " passed" in out
    where = run(sys.executable, "-c", "import pht; print(pht.__file__)", cwd=unpacked, env=env)
    assert Path(where.strip()).is_relative_to(unpacked)


def test_wheel_installs_without_extras(dist: Path, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    python = bin_dir / "python"
    run(python, "-m", "pip", "install", "--quiet", only(dist, f"{DIST}-*.whl"))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    # Run from an empty folder, so that the checkout's pht cannot be imported.
    code = "import pht, pht.proxy; print(pht.__file__, pht.BASE64_BACKEND)"
    where, backend = run(python, "-c", code, cwd=tmp_path, env=env).split()
    assert Path(where).is_relative_to(tmp_path / "venv")
    assert backend == "pybase64"
    assert "-L" in run(bin_dir / "pht", "--help", cwd=tmp_path, env=env)
    assert "-L" in run(python, "-m", "pht", "--help", cwd=tmp_path, env=env)
    missing = subprocess.run([python, "-c", "import yaml"], capture_output=True, cwd=tmp_path)
    assert missing.returncode != 0  # the cli extra was not asked for
