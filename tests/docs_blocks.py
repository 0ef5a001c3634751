"""The ``python`` code blocks of README.md and the documentation pages, and how each is tested.

A block runs as written unless the line right above its fence is a marker:

- ``<!-- docs-test: skip (why) -->``: not run (an outline, or it needs files or a download a test cannot have);
- ``<!-- docs-test: script (...) -->``: a whole program that starts processes; ``tests/test_docs_code.py`` runs it
  as a script through the launcher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
MARKER = re.compile(r"^\s*<!-- docs-test: (?P<kind>skip|script) \((?P<why>[^)]+.*)\) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str  # "run", "skip" or "script"
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documentation_files() -> list[Path]:
    """README.md, every page under docs/, and the benchmark results the site includes."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    found = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].lstrip().startswith("<!-- docs-test") and not MARKER.match(lines[i]):
                raise ValueError(f"{path}:{i + 1}: a malformed marker (docs-test: skip (why) or script (why))")
            i += 1
            continue
        indent = fence.group("indent")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: a python block that is never closed")
        code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end])
        marker = MARKER.match(lines[i - 1]) if i else None
        found.append(Block(path, i + 1, marker.group("kind") if marker else "run", code + "\n"))
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in documentation_files() for block in blocks(path)]
