"""The shape of the code: one direction of dependence, small files and classes, the
roles installed under the project's namespace, and a README layout that names every
file."""
import ast
import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ddp", "worker", "coordinator")
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 200
# the entry points wire a config to a role, so they may import the roles (and ddp-keygen
# zmq's key generator; ddp.session runs a config for both ddp-train and ddp.train);
# benchloops is a stand-alone benchmark program (mpi4py, torch)
ENTRY_POINTS = {"ddp/cli.py", "ddp/session.py", "ddp/api.py", "ddp/__main__.py", "ddp/worker_cli.py",
                "ddp/job_cli.py", "ddp/keygen.py", "ddp/benchloops.py"}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imported(path: Path) -> set[str]:
    """Top two levels of every module `path` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = rel(path).split("/")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the file's own top-level folder
                names.add(f"ddp.{package}" if package != "ddp" else "ddp")
            elif node.module:
                names.add(node.module)
    return {".".join(n.split(".")[:2]) for n in names}


def roles_imported(path: Path) -> set[str]:
    return {n for n in imported(path) if n in ("ddp.worker", "ddp.coordinator")}


@pytest.mark.parametrize("path", sources(), ids=rel)
def test_one_direction_of_dependence(path):
    name, mods = rel(path), imported(path)
    top = {m.split(".")[0] for m in mods}
    assert not top & {"worker", "coordinator"}, f"{name} imports a role by its bare name"
    if name.startswith("worker/"):
        assert "ddp.coordinator" not in mods, f"{name}: worker/ never imports coordinator/"
    if name.startswith("ddp/") and name not in ENTRY_POINTS:
        assert not roles_imported(path), f"{name}: the core imports no role"
        assert not top & {"mpi4py", "zmq"}, f"{name}: only the roles import mpi4py/zmq"


@pytest.mark.parametrize("path", sources(), ids=rel)
def test_files_and_classes_stay_small(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{rel(path)} has {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            n = node.end_lineno - node.lineno + 1
            assert n <= MAX_CLASS_LINES, f"{rel(path)}: class {node.name} has {n} lines"


def test_the_wheel_lists_every_package_under_ddp():
    """pyproject names every folder of the three (the dashboard's files are package
    data in folders of their own), the roles as ddp.worker and ddp.coordinator: their
    folders stay at the top of the repository."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for pkg in PACKAGES:
        for folder in [ROOT / pkg, *(ROOT / pkg).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__":
                parts = folder.relative_to(ROOT).parts
                found.add(".".join(parts) if parts[0] == "ddp" else "ddp." + ".".join(parts))
    assert set(project["packages"]) == found
    assert project["package-dir"] == {"ddp.worker": "worker", "ddp.coordinator": "coordinator"}


def _installed_from_a_wheel():
    """The distribution pip installed (it wrote INSTALLER; the egg-info a build leaves in
    the checkout has none), unless it is an editable install, whose files are the
    repository's."""
    for dist in importlib.metadata.distributions(name="ddp-train"):
        if not dist.read_text("INSTALLER"):
            continue
        origin = json.loads(dist.read_text("direct_url.json") or "{}")
        if not origin.get("dir_info", {}).get("editable"):
            return dist
    return None


def test_an_installed_wheel_has_no_top_level_worker_or_coordinator():
    dist = _installed_from_a_wheel()
    if dist is None:
        pytest.skip("ddp-train is not installed from a wheel here (an editable install?)")
    files = {f.as_posix() for f in dist.files or []}
    assert "ddp/worker/compute.py" in files and "ddp/coordinator/run.py" in files
    assert "ddp/dashboard/index.html" in files and "ddp/dashboard/vendor/uPlot.iife.min.js" in files
    assert not any(f.startswith(("worker/", "coordinator/")) for f in files)


def test_the_readme_layout_names_every_source_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"^(\S+\.py)\b", block, flags=re.M))
    want = {rel(p) for p in sources() if p.name != "__init__.py" or p.stat().st_size}
    assert named == want
