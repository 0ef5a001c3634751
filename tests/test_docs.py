"""The documentation: the MkDocs site builds with ``--strict`` (every link and anchor resolves, the options table is
generated from ``PipelineOptions``), README.md stays short with working links, and CI runs README's commands."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from pathlib import Path

import pytest

from lightning_bfpp.options import PipelineOptions

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 12_000  # bytes
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def build_site(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mkdocs build --strict`` in this process (``strict: true`` is in mkdocs.yml): any warning aborts it."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")  # Material's banner about MkDocs 2
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(site_dir), strict=True)
    build(config)


def test_site_builds_strictly_with_the_generated_options_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site"
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        try:
            build_site(site, monkeypatch)
        except SystemExit as abort:  # mkdocs' Abort on a warning in strict mode
            warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
            pytest.fail(f"mkdocs build --strict failed: {abort}\n{warnings}")
    options_page = (site / "reference" / "options" / "index.html").read_text()
    for field in dataclasses.fields(PipelineOptions):
        assert f"<td><code>{field.name}</code></td>" in options_page, field.name
    assert "](#" not in options_page  # the help texts' section links point at pages
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "BFPPStrategy" in api and "PipelineModule" in api and "pipeline_layers" in api
    assert ":class:" not in api and ":meth:" not in api  # Sphinx roles shown as code
    assert (site / "benchmarks" / "RESULTS" / "index.html").exists()  # the benchmark results are a page


def test_the_options_page_holds_the_generated_table() -> None:
    """docs/reference/options.md shows the table on GitHub too: it must be the one the site build generates."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.OPTIONS_PAGE.read_text()
    assert "<!-- options-table -->" in page
    assert hooks.with_options_table(page, "reference/options.md") == page, "regenerate it: python docs/hooks.py"


def test_readme_is_short_and_its_links_point_at_files() -> None:
    text = README.read_text()
    size = len(text.encode())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move sections into docs/ (limit {README_LIMIT})"
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]
    assert targets, "README links to the documentation pages"
    for target in targets:
        path = target.split("#", 1)[0]
        assert path and (ROOT / path).exists(), f"README links to {target}, which is not a file of the repository"
    for page in sorted((ROOT / "docs").rglob("*.md")):
        assert page.relative_to(ROOT).as_posix() in targets, f"README does not link {page.relative_to(ROOT)}"


def test_ci_runs_the_readme_commands() -> None:
    """The two set-up commands of README (install, then test) are what .ci/run runs."""
    setup = README.read_text().split("## Set-up\n", 1)[1]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = block.strip().split("\n")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci, f".ci/run does not run README's test command {test!r}"
    ci_installs = [line.replace("python -m pip", "pip").replace(" --quiet", "") for line in ci if "pip install" in line]
    steps = install.split(" && ")
    assert ci_installs == steps[:-1], (ci_installs, install)
    assert steps[-1] == "python examples/train.py", "README's install command ends by running the main job"
