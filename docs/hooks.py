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
OPTIONS_TABLE = re.compile(r"(<!-- options-table -->\n).*?(<!-- /options-table -->)", re.S)
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


def with_options_table(markdown: str, page_uri: str) -> str:
    """``markdown`` with the table between the ``options-table`` markers generated afresh."""
    return OPTIONS_TABLE.sub(lambda m: m.group(1) + "\n" + options_table(page_uri) + "\n" + m.group(2), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return with_options_table(markdown, page.file.src_uri)


SPHINX_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):<code>~?")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Docstrings cite code with Sphinx roles (``:class:`~a.B```): show them as plain code."""
    return SPHINX_ROLE.sub("<code>", html)


OPTIONS_PAGE = ROOT / "docs" / "reference" / "options.md"

if __name__ == "__main__":  # python docs/hooks.py: regenerate the options table of docs/reference/options.md
    OPTIONS_PAGE.write_text(with_options_table(OPTIONS_PAGE.read_text(), "reference/options.md"))
