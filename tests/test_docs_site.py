"""The documentation site builds strictly, and documents every public name.

``mkdocs build --strict`` turns a broken link, a page missing from the nav or
a mkdocstrings warning into a failure; the docstring check below makes an
undocumented public name one too (mkdocstrings would render it silently).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("pht", "pht.proxy", "pht.asyncio")


def public_names(module: str) -> list[str]:
    names: list[str] = importlib.import_module(module).__all__
    return names


def require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is missing: pip install -r requirements-docs.txt")


def test_every_public_name_and_method_has_a_docstring() -> None:
    require("griffe")
    import griffe

    package = griffe.load("pht", search_paths=[str(ROOT)], allow_inspection=False)
    missing = []
    for module in MODULES:
        namespace = package if module == "pht" else package[module.removeprefix("pht.")]
        for name in public_names(module):
            obj = namespace[name]
            target = obj.final_target if obj.is_alias else obj
            if not target.docstring:
                missing.append(f"{module}.{name}")
            if not target.is_class:
                continue
            # Methods the class itself defines; fields are described in the
            # class docstring.
            for member_name, member in target.members.items():
                if member.is_alias or not member.is_function:
                    continue
                if member_name.startswith("_") and member_name != "__call__":
                    continue
                if not member.docstring:
                    missing.append(f"{module}.{name}.{member_name}")
    assert missing == [], f"public names without a docstring: {missing}"


@pytest.mark.slow
def test_mkdocs_build_strict_documents_every_public_name(tmp_path: Path) -> None:
    require("mkdocs")
    require("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    page = (site / "reference" / "index.html").read_text()
    anchors = set(re.findall(r'id="([^"]+)"', page))
    absent = [
        f"{module}.{name}"
        for module in MODULES
        for name in public_names(module)
        if f"{module}.{name}" not in anchors
    ]
    assert absent == [], f"missing from the API reference: {absent}"
