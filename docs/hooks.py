"""MkDocs hooks: the benchmark results and figures become part of the site, and the options table is generated from
``PipelineOptions`` when the site is built."""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
OPTIONS_MARKER = "<!-- options-table -->"
# the sections that the options' help texts link to, by anchor, and the pages that hold them now
SECTION_PAGES = {
    "sharded-data-parallelism": "guide/sharding.md",
    "saving-activation-memory": "guide/memory.md",
    "performance": "guide/performance.md",
}


def on_files(files: Files, config: Any) -> Files:
    """Adds ``benchmarks/`` (``RESULTS.md`` as a page, its figures and data as files) under the same paths."""
    for path in sorted(BENCHMARKS.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".pyc":
            files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files


def options_table(page_uri: str) -> str:
    """``lightning_bfpp.options.markdown_table()`` with its section links pointing at the site's pages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lightning_bfpp.options import markdown_table

    def link(match: re.Match[str]) -> str:
        anchor = match.group(1)
        if anchor not in SECTION_PAGES:
            raise ValueError(f"An option's help links to #{anchor}: add the page that holds it to SECTION_PAGES")
        return "](" + posixpath.relpath(SECTION_PAGES[anchor], posixpath.dirname(page_uri) or ".") + ")"

    return re.sub(r"\]\(#([\w-]+)\)", link, markdown_table())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if OPTIONS_MARKER in markdown:
        markdown = markdown.replace(OPTIONS_MARKER, options_table(page.file.src_uri))
    return markdown
