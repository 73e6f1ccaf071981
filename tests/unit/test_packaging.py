"""Test support stays out of the product: the installed packages are ``batchsvc`` and
``workers`` only, and nothing in them imports ``testsupport``."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("batchsvc", "workers")


def test_the_installed_packages_leave_test_support_out() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = find_packages(where=str(ROOT), include=include)
    assert installed, "the package discovery found nothing"
    assert {name.split(".")[0] for name in installed} == set(PRODUCT)
    assert "testsupport" in find_packages(where=str(ROOT))  # it exists, just not shipped


def test_no_product_module_imports_test_support() -> None:
    offenders = []
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [
                    f"{path.relative_to(ROOT)}: {n}"
                    for n in names
                    if n.split(".")[0] == "testsupport"
                ]
    assert offenders == []
