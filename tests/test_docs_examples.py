"""Every ```python block in README.md and docs/*.md runs.

Each block is a whole program: it is run in a fresh interpreter, from an
empty folder, and must exit 0 (the examples serve on loopback, port 0, and
cancel their own nursery). A block that is deliberately not runnable (a list
of signatures, a host that is not on this machine) carries the marker

    <!-- not-run: why -->

on the line just above its fence. The markers are counted below, per file,
so that a new one is a decision made in this file, not a slip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- not-run: (?P<why>\S.*\S) -->$")

# The blocks that are deliberately not run, per document.
NOT_RUN = {
    "docs/proxy.md": 1,  # the connectors' signatures
    "docs/asyncio.md": 1,  # a server that runs until cancelled
    "docs/deployment.md": 1,  # a client behind a proxy at example.com
}


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the marker's reason


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.match(above.strip())
            blocks.append(
                Block(
                    document=str(path.relative_to(ROOT)),
                    line=start + 1,
                    code="\n".join(lines[start + 1 : end]) + "\n",
                    not_run=match.group("why") if match else None,
                )
            )
            i = end
        i += 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]
RUNNABLE = [block for block in BLOCKS if block.not_run is None]


def test_not_run_blocks_are_the_counted_ones() -> None:
    counted: dict[str, int] = {}
    for block in BLOCKS:
        if block.not_run is not None:
            counted[block.document] = counted.get(block.document, 0) + 1
    assert counted == NOT_RUN
    assert len(RUNNABLE) >= 5  # README, quickstart (3), proxy


def test_markers_stand_only_above_python_blocks() -> None:
    """A marker anywhere else (a typo, a moved block) would silently mark nothing."""
    placed = sum(block.not_run is not None for block in BLOCKS)
    written = sum(
        bool(MARKER.match(line.strip()))
        for path in DOCUMENTS
        for line in path.read_text().splitlines()
    )
    assert written == placed


@pytest.mark.parametrize(
    "block", RUNNABLE, ids=[f"{block.document}:{block.line}" for block in RUNNABLE]
)
def test_python_example_runs(block: Block, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # the checkout's pht, whatever is installed
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    where = f"{block.document}, the block at line {block.line}"
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"{where}:\n{result.stderr}"


def test_install_commands_name_the_distribution() -> None:
    """``pip install pht`` would install an unrelated project: say pht-tunnel."""
    commands = [
        (path.name, line.strip())
        for path in DOCUMENTS
        for line in path.read_text().splitlines()
        if "pip install" in line and "-r requirements" not in line
    ]
    assert commands
    wrong = [(name, line) for name, line in commands if "pht-tunnel" not in line]
    assert wrong == []
    assert not [line for _, line in commands if re.search(r"pip install '?pht[\[ ']", line)]
