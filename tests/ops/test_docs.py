"""What the README shows and what examples/ holds runs, as a newcomer would run it.

* Every ```python block of the README runs in a fresh process, in a temp working
  directory, with the checkout and ``src`` on ``PYTHONPATH`` (the README says to run
  from the checkout with ``PYTHONPATH=.``) and a private ``XDG_RUNTIME_DIR``, so the
  subprocess runtime's replicas live in this test's own directory.
* Every ```toml block is an app file: it parses, and one whose first line names a file
  (``# examples/app.toml: ...``) is that file, byte for byte.
* A block that cannot run on its own is marked on the line before it with
  ``<!-- not run: why -->``; the mark is for fragments (a pyproject table), not for
  snippets that fail.
* Every file in examples/ is run or loaded; a new one without a check here fails.
* Links between the documents resolve, and every ``§N`` names docs/design.md and a
  section it has.

Replica processes a snippet leaves running (the subprocess runtime's outlive their
host, as the README says) are stopped through the controller at the end, and by pid,
found by this test's directory on their command line, if that fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from servecore.app import load_app, parse_app
from subprocess_helpers import kill_everything_under

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
SNIPPET_TIMEOUT_S = 180

_FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: .+ -->$")


class Block(NamedTuple):
    """A fenced code block of a Markdown file."""

    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    run: bool  # False when marked <!-- not run: ... --> on the line before

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of the Markdown file at ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        marked = start > 0 and _NOT_RUN.match(lines[start - 1].strip()) is not None
        blocks.append(Block(fence["lang"], "\n".join(body) + "\n", start + 1, not marked))
        i += 1
    return blocks


BLOCKS = code_blocks(README)
PYTHON = [b for b in BLOCKS if b.lang == "python" and b.run]
TOML = [b for b in BLOCKS if b.lang == "toml" and b.run]


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in ``cwd`` as the README's reader would, from the checkout."""
    runtime_dir = cwd / "xdg"
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    path = os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env = {**os.environ, "PYTHONPATH": path, "XDG_RUNTIME_DIR": str(runtime_dir)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )


def run_snippet(code: str, cwd: Path, *argv: str) -> str:
    """Run ``python -c CODE ARGV`` and return what it printed; fail with its stderr."""
    return run_ok(["-c", code, *argv], cwd)


def run_ok(args: list[str], cwd: Path) -> str:
    """Run ``python ARGS`` and return what it printed; fail with its stderr."""
    result = run_python(args, cwd)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A temp working directory; replica processes left under it are killed by pid."""
    try:
        yield tmp_path
    finally:
        kill_everything_under(tmp_path)


# ---------------------------------------------------------------------------------------
# The README's snippets.

# Stops every endpoint and backend of a subprocess-runtime checkpoint, printing the
# replicas it adopted (tag -> pid) first.
_TEARDOWN = """
import json, sys, trio, servecore

async def main(db):
    async with servecore.open_controller(
        runtime="subprocess", store=servecore.SQLiteStore(db)
    ) as ctl:
        status = await ctl.status()
        print(json.dumps({r.tag: r.pid for b in status.backends for r in b.replicas}))
        if sys.argv[2] == "stop":
            for name in list(ctl.state.endpoints):
                await ctl.delete_endpoint(name)
            for tag in list(ctl.state.backends):
                await ctl.delete_backend(tag)

trio.run(main, sys.argv[1])
"""


def _subprocess_store(code: str) -> str | None:
    """The SQLite checkpoint of a snippet on the subprocess runtime, if it is one."""
    if 'runtime="subprocess"' not in code:
        return None
    found = re.search(r'SQLiteStore\("([^"]+)"\)', code)
    assert found, "a subprocess snippet names its SQLiteStore, so its replicas can be stopped"
    return found[1]


def _replicas(db: str, cwd: Path, action: str) -> dict[str, int]:
    """The replicas (tag -> pid) a controller on ``db`` adopts; ``"stop"`` stops them."""
    return json.loads(run_snippet(_TEARDOWN, cwd, db, action).splitlines()[-1])


def test_the_readme_has_snippets_to_run() -> None:
    # A change to the fence format must not silently leave nothing to test.
    assert len(PYTHON) >= 3
    assert TOML


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_each_python_snippet_of_the_readme_runs(block: Block, workdir: Path) -> None:
    printed = run_snippet(block.code, workdir)
    assert printed.strip(), "each snippet prints what it shows the reader"
    db = _subprocess_store(block.code)
    if db is not None:
        # The README's promise: the replicas outlived the snippet, and stop when deleted.
        left = _replicas(db, workdir, "stop")
        assert left and all(pid for pid in left.values())
        assert _replicas(db, workdir, "look") == {}


@pytest.mark.slow
def test_a_second_run_of_the_subprocess_quickstart_finds_the_same_processes(
    workdir: Path,
) -> None:
    [block] = [b for b in PYTHON if _subprocess_store(b.code)]
    db = _subprocess_store(block.code)
    assert db is not None
    run_snippet(block.code, workdir)
    first = _replicas(db, workdir, "look")
    again = run_snippet(block.code, workdir)
    assert "'model': 'v1'" in again
    assert _replicas(db, workdir, "stop") == first  # same tags, same pids: adopted
    assert len(first) == 2


def test_the_sync_quickstart_answers_from_the_example_model(workdir: Path) -> None:
    [block] = [b for b in PYTHON if "servecore.start(runtime=" in b.code]
    answer = run_snippet(block.code, workdir)
    assert "'label': 'positive'" in answer
    assert (workdir / ".servecore" / "quickstart.db").exists()  # its own, not servecore run's


@pytest.mark.parametrize("block", TOML, ids=str)
def test_each_toml_block_of_the_readme_is_a_valid_app_file(block: Block) -> None:
    app = parse_app(block.code, source=str(block))
    claimed = re.match(r"# (?P<path>[\w./-]+\.toml)\b", block.code)
    if claimed is not None:
        path = ROOT / claimed["path"]
        assert block.code == path.read_text(encoding="utf-8"), (
            f"{block} shows {claimed['path']} but differs from it; copy the file again"
        )
        assert app == load_app(path)


def test_the_readme_shows_the_example_app_file() -> None:
    assert any(b.code.startswith("# examples/app.toml") for b in TOML)


def test_only_fragments_are_marked_not_run() -> None:
    skipped = [b for b in BLOCKS if not b.run]
    assert len(skipped) <= 3, f"too many blocks left untested: {[str(b) for b in skipped]}"


# ---------------------------------------------------------------------------------------
# examples/


CHECKED_EXAMPLES = {"__init__.py", "demo.py", "textapp.py", "app.toml", "mp_runtime"}


def test_every_file_in_examples_is_checked() -> None:
    # mp_runtime, the example plugin, is run by tests/kit/test_kit_example_plugin.py.
    present = {p.name for p in EXAMPLES.iterdir() if p.name != "__pycache__"}
    assert present == CHECKED_EXAMPLES, "add a check here for each new example"


@pytest.mark.slow
def test_make_demo_runs_end_to_end(workdir: Path) -> None:
    printed = run_ok(["-m", "examples.demo"], workdir)
    assert "3. Controller closed. Reopen it from the checkpoint:" in printed
    assert re.search(r"POST http://127\.0\.0\.1:\d+/sentiment -> 200 \{", printed)
    assert printed.rstrip().endswith("(`make clean` removes it).")
    assert (workdir / ".servecore" / "demo.db").exists()


def _textapp() -> Any:
    spec = importlib.util.spec_from_file_location("textapp", EXAMPLES / "textapp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_models_answer_as_the_readme_shows() -> None:
    textapp = _textapp()
    v1 = textapp.SentimentV1(threshold=0.0, cost_s=0)
    # The answer the README's curl example prints.
    assert v1({"text": "I love this"}) == {"label": "positive", "score": 1.667, "model": "v1"}
    v2 = textapp.SentimentV2(cost_s=0, cost_per_text_s=0)
    texts = textapp.SAMPLE_TEXTS
    answers = v2([{"text": t} for t in texts])
    assert len(answers) == len(texts) and {a["batch"] for a in answers} == {len(texts)}
    assert v2([{"text": "not good"}])[0]["label"] == "negative"  # v2 reads negation


def test_the_example_app_file_loads_and_its_autoscaling_alternative_is_valid() -> None:
    text = (EXAMPLES / "app.toml").read_text(encoding="utf-8")
    app = load_app(EXAMPLES / "app.toml")
    assert app.backends["sentiment-v2"].config.num_replicas == 1
    # The file's comment says how to switch v2 to autoscaling; doing so must be valid.
    switched = re.sub(r"(?m)^num_replicas = 1\n", "", text)
    switched = re.sub(
        r"(?m)^# (\[backends\.sentiment-v2\.autoscaling\]|min_replicas|max_replicas|target_)",
        r"\1",
        switched,
    )
    autoscaling = parse_app(switched).backends["sentiment-v2"].config.autoscaling
    assert autoscaling is not None
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)


# ---------------------------------------------------------------------------------------
# References between the documents.

_LINK = re.compile(r"\]\((?P<target>[^)#\s]*)(?:#(?P<anchor>[^)\s]*))?\)")
_SECTION = re.compile(r"§(?P<n>\d+)(?P<sub>\.\d+)?")


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for found in _LINK.finditer(text):
        target, anchor = found["target"], found["anchor"]
        if "://" in target or target.startswith("mailto:"):
            continue
        linked = doc.parent / target if target else doc
        assert linked.exists(), f"{doc.name} links to {target}, which is missing"
        if anchor:
            missing = f"{doc.name} links to {target}#{anchor}: no such heading"
            assert anchor in _anchors(linked), missing


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings (outside code blocks)."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_section_reference_names_design_md_and_an_existing_section() -> None:
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"(?m)^## §(\d+) ", design)}
    wrong: list[str] = []
    files = [README, *DOCS.glob("*.md"), *(ROOT / "src").rglob("*.py"), *ROOT.glob("tests/**/*.py")]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for found in _SECTION.finditer(line):
                where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                if found["sub"] or int(found["n"]) not in sections:
                    wrong.append(where)  # design.md has §1..§N, no subsections
                elif path.name != "design.md" and "design.md" not in line:
                    wrong.append(where)  # a § that does not say which document
    # This file's own patterns are not references.
    wrong = [w for w in wrong if not w.startswith("tests/ops/test_docs.py")]
    assert not wrong, "\n".join(wrong)
