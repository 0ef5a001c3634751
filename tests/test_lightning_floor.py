"""The plugin against the oldest Lightning release ``pyproject.toml`` allows (the rest of the suite runs against the
installed one, the newest in CI): that release is installed from the package index into a temporary folder and a
representative subset of the tests runs in a subprocess that imports it first."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

from launch import run_python
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# the Lightning-specific subset: every private name the plugin uses, and one pipelined run against one process
SUBSET = [
    "tests/test_lightning_internals.py",
    "tests/test_equivalence.py::test_pipelined_training_matches_one_process[P2-L1-M4-bf-sgd]",
]

# runs pytest after printing which Lightning it imported (PYTHONPATH puts the floor release first)
PYTEST_WITH_VERSION = (
    "import sys, lightning, pytest; "
    "print(f'imported lightning {lightning.__version__} from {lightning.__file__}', flush=True); "
    "import lightning_bfpp; "
    "print(f'imported lightning_bfpp from {lightning_bfpp.__file__}', flush=True); "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


def lightning_floor() -> str:
    """The lower bound of the ``lightning`` requirement in ``pyproject.toml``."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        dependencies = [Requirement(line) for line in tomllib.load(file)["project"]["dependencies"]]
    (lightning,) = [req for req in dependencies if req.name == "lightning"]
    lower = [spec.version for spec in lightning.specifier if spec.operator == ">="]
    assert len(lower) == 1, f"pyproject.toml's lightning requirement {lightning} has no single '>=' lower bound"
    return lower[0]


def install_release(version: str, target: Path) -> None:
    """``pip install --no-deps --target`` of ``lightning==version``; fails the test if the index cannot give it."""
    pip = ["-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    code, output = run_python(
        [*pip, "--retries", "1", "--timeout", "20", "--target", str(target), f"lightning=={version}"],
        timeout=90,
        name=f"pip install lightning=={version} from the package index",
    )
    assert code == 0, (
        f"pip could not install lightning=={version} (the floor in pyproject.toml) from the package index; this "
        f"test needs the index to test that release:\n{output[-3000:]}"
    )


def unmet_requirements(target: Path) -> list[str]:
    """The requirements of the release installed in ``target`` that the environment's packages do not meet."""
    (release,) = importlib.metadata.distributions(path=[str(target)])
    unmet = []
    for line in release.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra's requirement
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{req} (installed: {installed})")
    return unmet


def test_plugin_works_with_the_lightning_floor(tmp_path: Path) -> None:
    floor = lightning_floor()
    target = tmp_path / "lightning-floor"
    install_release(floor, target)
    unmet = unmet_requirements(target)
    assert not unmet, f"lightning=={floor} needs other versions of the installed packages: {unmet}"

    pythonpath = os.pathsep.join(filter(None, [str(target), str(ROOT), os.environ.get("PYTHONPATH")]))
    code, output = run_python(
        ["-c", PYTEST_WITH_VERSION, "-q", "-x", "-rA", "-p", "no:cacheprovider", *SUBSET],
        timeout=180,
        cwd=ROOT,
        PYTHONPATH=pythonpath,
        name=f"pytest under lightning=={floor}",
    )
    imported = re.search(r"^imported lightning (\S+) from (\S+)$", output, re.M)
    assert imported is not None, output[-3000:]
    assert Version(imported[1]) == Version(floor) and Path(imported[2]).is_relative_to(target), imported[0]
    assert code == 0, f"the subset failed under lightning=={floor}:\n{output[-6000:]}"
    assert f"imported lightning_bfpp from {ROOT / 'lightning_bfpp'}" in output, output[-3000:]
    passed = re.findall(r"^PASSED (\S+)", output, re.M)
    assert SUBSET[1] in passed and any(test.startswith(SUBSET[0]) for test in passed), output[-3000:]
    assert not re.search(r"^(FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", output, re.M), output[-3000:]
