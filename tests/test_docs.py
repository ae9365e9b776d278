"""The examples in README.md and docs/ run, so that none can silently go stale.

- every ```python block runs in a fresh interpreter; the blocks of one page share a namespace,
  in page order;
- every ```console line `$ spa ...` runs through the CLI and must exit 0 (its output, which
  holds timings, is not compared);
- the generated result tables match the rows in tools/results/*.json;
- the site builds with `mkdocs build --strict` where mkdocs is installed.

Each page runs in a fresh folder holding a copy of models/, so examples read the shipped
models by their relative paths and write wherever they like. A block that cannot run here is
marked with `<!-- skip-test: why -->` on the line before it; the reason is required.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import render_results  # tools/ is on sys.path (conftest)
from click.testing import CliRunner

from spa.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip-test:(?P<why>.*?)-->\s*$", re.S)
SHELL = ("console", "shell", "sh", "bash", "")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None  # why the block does not run, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[str]:
        return [line[2:].strip() for line in self.code.splitlines() if line.startswith("$ ")]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = SKIP.search(before[before.rfind("\n") + 1 :]) if before else None
        if marker is not None and not marker["why"].strip():
            raise AssertionError(f"{page}: a skip-test marker must say why the block cannot run")
        code = "\n".join(line[len(match["indent"]) :] for line in match["code"].splitlines())
        found.append(
            Block(
                page,
                text.count("\n", 0, match.start()) + 1,
                match["lang"],
                code,
                marker["why"].strip() if marker else None,
            )
        )
    return found


def _pages_with(kind) -> list[Path]:
    return [p for p in PAGES if any(kind(b) for b in blocks(p))]


def _is_python(block: Block) -> bool:
    return block.lang == "python"


def _is_spa_console(block: Block) -> bool:
    return block.lang in SHELL and any(c.split()[:1] == ["spa"] for c in block.commands())


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


PYTHON_PAGES = _pages_with(_is_python)
CONSOLE_PAGES = _pages_with(_is_spa_console)


# runs a page's blocks in order in one namespace; tracebacks name the page and line of each block
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for where, code in json.load(open(sys.argv[1])):
    exec(compile(code, where, "exec"), namespace)
"""


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_ids(PYTHON_PAGES))
def test_python_examples_run(page, workdir):
    # a fresh interpreter, as a reader has: in this one, modules other tests imported would hide
    # an example that forgets an import (`import spa` alone does not load spa.formats.export)
    code = [(b.where, b.code) for b in blocks(page) if _is_python(b) and not b.skip]
    (workdir / "blocks.json").write_text(json.dumps(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "blocks.json"], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"an example of {page.relative_to(ROOT)} fails:\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("page", CONSOLE_PAGES, ids=_ids(CONSOLE_PAGES))
def test_cli_examples_exit_0(page, workdir):
    for block in blocks(page):
        if not _is_spa_console(block) or block.skip:
            continue
        for command in block.commands():
            # a reader copies every line of an example: a console block holds spa commands only
            assert command.split()[0] == "spa", f"{block.where}: '{command}' is not a spa command"
            result = CliRunner().invoke(main, shlex.split(command)[1:])
            assert result.exit_code == 0, (
                f"{block.where}: `{command}` exited {result.exit_code}:\n{result.output}{result.exception!r}"
            )


def test_every_example_is_run_or_says_why_not():
    shell = [b for p in PAGES for b in blocks(p) if b.lang in SHELL and b.commands()]
    for block in shell:
        # `$ ` marks a command to run; other commands (pip, python tools/...) go in blocks without it
        assert _is_spa_console(block) and block.lang == "console", (
            f"{block.where}: a block of `$ ` commands must be a ```console block of spa commands"
        )
    langs = {b.lang for p in PAGES for b in blocks(p)}
    # a block in another language would be neither run nor flagged
    assert langs <= {"python", "console", "bash", "text", "yaml", "json"}, langs
    skipped = [b for p in PAGES for b in blocks(p) if b.skip]
    assert len(skipped) <= 3, f"examples should run; {len(skipped)} are skipped: {[b.where for b in skipped]}"


def test_generated_results_are_up_to_date(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    render_results.render(docs)
    stale = [
        str(p.relative_to(docs))
        for p in sorted(docs.rglob("*.md"))
        if p.read_text() != (ROOT / "docs" / p.relative_to(docs)).read_text()
    ]
    assert not stale, f"run `python tools/render_results.py`: {stale} differ from tools/results/*.json"
    assert "<!-- generated: accuracy-table -->" in (docs / "results" / "accuracy.md").read_text()


def test_docs_build_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
