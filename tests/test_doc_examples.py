"""Every shell example in README.md and docs/*.md runs as written, the way doctest keeps
examples honest.

The convention (docs/index.md, "Examples in these pages"), by the fence's info string:

- ```bash        runnable: this test runs it with `bash -euo pipefail` in a directory laid out
                 like `make demo`'s output (demo/registry with LR, DeepFM and APG-DeepFM
                 bundles, demo/data a synthetic world, demo/experiments.yaml serving them as the
                 arms of experiment `ranker`), with `.venv/bin` first on PATH and a live scorer
                 `ctrserve serve --registry demo/registry --experiments demo/experiments.yaml
                 --features demo/data` on a port it binds itself. `127.0.0.1:8000` and
                 `localhost:8000` become that port. Every curl must get a 2xx reply (the test
                 runs curl with --fail-with-body) and no output may hold a rejected event or a
                 traceback.
- ```bash error  runnable, and meant to fail: its curl must get a 4xx reply whose body is the
                 scorer's `{"detail": [...]}` naming the field (curl runs without
                 --fail-with-body there and writes the status after the body).
- ```bash norun  shown, not run: it needs the demo's full run, minutes of training, a
                 benchmark, Docker, systemd, the real datasets, or it starts a server that
                 keeps running.
- ```bash mine   runs in tests/test_byod.py instead, against the scorer of a new user's own
                 model (docs/data.md, "From a CSV file to a verified bundle").
- any other language (text, json, yaml, python, promql, ...) is not a command. A fence without
  a language, or a `sh`/`shell`/`console` fence, fails the test: every block says what it is.

Also every `http://127.0.0.1:8000/...` or `http://localhost:8000/...` URL written in the prose
(the dashboard, /docs, ...) is fetched from the live scorer and must answer 200.
The counts of examples run are asserted, so deleting examples fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash"}
REFUSED = {"", "sh", "shell", "console", "zsh"}
FLAGS = {"norun", "error", "mine"}
# Lower bounds: the examples these pages hold when this test was written. Raise them when you
# add examples; a drop means an example was deleted or lost its tag.
MIN_BLOCKS, MIN_COMMANDS, MIN_ERRORS, MIN_URLS = 16, 32, 4, 3
COMMAND = re.compile(r"(?<![\w./-])(?:curl|ctrserve) ")
REJECTED = re.compile(r'"status"\s*:\s*"rejected"')
URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):8000(/[^\s`)\"'<>]*)?")
# the wrapper every runnable block gets: an HTTP error status is a failed command; in an
# `error` block, curl writes the status after the body instead
PRELUDE = "curl() { command curl --fail-with-body --silent --show-error \"$@\"; }\n"
ERROR_PRELUDE = ("curl() { command curl --silent --show-error -w '\\nHTTP %{http_code}\\n' "
                 "\"$@\"; }\n")
CLIENT_ERROR = re.compile(r"^HTTP 4\d\d$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    flags: frozenset[str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown page, and its prose lines (outside the fences)."""
    blocks, prose = [], []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$",
                                              lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        lang = info[0] if info else ""
        blocks.append(Block(str(path.relative_to(REPO)), start, lang, frozenset(info[1:]),
                            "\n".join(body) + "\n"))
    return blocks, prose


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page)[0]]


def test_every_fence_says_what_it_is():
    assert (REPO / "docs").is_dir() and len(PAGES) > 5
    bad = [f"{b.where}: ```{b.lang or '(none)'}" for b in all_blocks() if b.lang in REFUSED]
    assert not bad, "tag these blocks bash, bash norun, bash error, text, ...: " + ", ".join(bad)
    flags = [f"{b.where}: {sorted(b.flags - FLAGS)}" for b in all_blocks()
             if b.lang in SHELL and b.flags - FLAGS]
    assert not flags, "unknown flags: " + ", ".join(flags)


def test_readme_stays_one_screen_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


# ---- the live demo-like scorer ------------------------------------------------------------

def _env() -> dict[str, str]:
    """Nothing of the caller's Redis or scorer settings: the examples see the demo's set-up."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CTRSERVE_") and k != "REDIS_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def demo_dir(bundles, synth_dir, tmp_path_factory) -> Path:
    """A working directory shaped like `make demo`'s: demo/{data,registry,experiments.yaml}."""
    from ctrserve.cli.demo import experiments_yaml

    work = tmp_path_factory.mktemp("doc-examples")
    demo = work / "demo"
    (demo / "registry").mkdir(parents=True)
    (demo / "data").symlink_to(synth_dir, target_is_directory=True)
    names = {}
    for model in ("lr", "deepfm", "apg-deepfm"):
        shutil.copytree(bundles[model], demo / "registry" / bundles[model].name)
        names[model] = bundles[model].name
    (demo / "experiments.yaml").write_text(experiments_yaml(names))
    return work


@pytest.fixture(scope="module")
def scorer(demo_dir) -> Iterator[str]:
    args = ["--registry", "demo/registry", "--experiments", "demo/experiments.yaml",
            "--features", "demo/data", "--host", "127.0.0.1", "--log-level", "warning"]
    with ServeProcess(args, _env(), cwd=demo_dir) as server:
        yield server.wait_ready(timeout=180)


def _local(text: str, url: str) -> str:
    return re.sub(r"(?:127\.0\.0\.1|localhost):8000\b", url.removeprefix("http://"), text)


def _run(block: Block, cwd: Path, url: str) -> subprocess.CompletedProcess:
    script = (ERROR_PRELUDE if "error" in block.flags else PRELUDE) + _local(block.text, url)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"),
                    reason="the examples use curl, absent here (.ci/run installs it)")
def test_shell_examples_run_as_written(demo_dir, scorer):
    runnable = [b for b in all_blocks() if b.lang in SHELL and not b.flags & {"norun", "mine"}]
    ran, commands, failed_on_purpose, problems = 0, 0, 0, []
    for block in runnable:
        out = _run(block, demo_dir, scorer)
        text = out.stdout + out.stderr
        if "error" in block.flags:
            if out.returncode != 0 or not CLIENT_ERROR.search(out.stdout) \
                    or '{"detail":[' not in out.stdout:
                problems.append(f"{block.where}: expected a 4xx with a detail, got exit "
                                f"{out.returncode}:\n{text[-1500:]}")
            failed_on_purpose += 1
            continue
        if out.returncode != 0:
            problems.append(f"{block.where}: exit {out.returncode}:\n{text[-1500:]}")
        elif REJECTED.search(text) or "Traceback" in text:
            problems.append(f"{block.where}: an error in the output:\n{text[-1500:]}")
        ran += 1
        commands += len(COMMAND.findall(block.text))
    assert not problems, "\n\n".join(problems)
    print(f"doc examples: {ran} blocks ran ({commands} curl and ctrserve commands), "
          f"{failed_on_purpose} failed as documented, {len(all_blocks()) - len(runnable)} "
          f"blocks not run")
    assert ran >= MIN_BLOCKS, f"only {ran} runnable blocks ran"
    assert commands >= MIN_COMMANDS, f"only {commands} curl and ctrserve commands ran"
    assert failed_on_purpose >= MIN_ERRORS, f"only {failed_on_purpose} error examples ran"


def test_scorer_urls_in_the_prose_answer(scorer):
    paths = sorted({m.group(1).rstrip(".,;:") for page in PAGES
                    for m in URL.finditer("\n".join(fenced_blocks(page)[1])) if m.group(1)})
    problems = []
    for path in paths:
        status = httpx.get(scorer + path, timeout=30, follow_redirects=True).status_code
        if status != 200:
            problems.append(f"{path}: {status}")
    assert not problems, problems
    print(f"doc URLs: {len(paths)} answered 200: {paths}")
    assert len(paths) >= MIN_URLS, paths
