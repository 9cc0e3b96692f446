"""Packaging: one installed top-level name, ``funnel``, and no code importing the folders by their bare names."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("events", "recall", "rank", "bundle", "evaluation", "server", "tools")


def _python_files():
    for folder in (*FOLDERS, "tests"):
        for parent, _, names in os.walk(os.path.join(REPO_ROOT, folder)):
            yield from (os.path.join(parent, n) for n in names if n.endswith(".py"))


def test_nothing_imports_the_bare_folder_names():
    # From the repository root a bare ``import tools`` would still resolve, to the checkout
    # rather than the installed package, so only the source can tell.
    bad = []
    for path in _python_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}: import {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not bad, "import these through the funnel package:\n" + "\n".join(bad)


def test_wheel_holds_only_funnel(tmp_path):
    # Built from a copy: setuptools reuses the checkout's build/ folder, where a deleted module would linger.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), source / name)
    for folder in FOLDERS:
        shutil.copytree(os.path.join(REPO_ROOT, folder), source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("funnel-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops - {"funnel"} == {f"funnel-{wheel.name.split('-')[1]}.dist-info"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    for folder in FOLDERS:
        assert f"funnel/{folder}/__init__.py" in names, folder
    assert "funnel/server/rpc/recommender_pb2.py" in names
