"""Every sample of the documentation runs, and prints what the page shows.

Pages are read as mkdocs renders them: `--8<--` includes of the examples' code are
expanded by pymdownx.snippets itself, configured as in mkdocs.yml. Each page's
```python blocks run in order, in one namespace, in a process of their own
whose working directory is a fresh temporary directory: a page's samples are
self-contained and build what they need offline. A block titled `title="name"` is
written to that file instead, and each `bridge ...` line of a ```sh block runs the real
command there (exit 0, or the `# exits N` its comment says). A ```text block right
after is the output expected, compared line by line. The sharded
loading page runs with 8 simulated CPU devices (XLA fixes the count when jax starts).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import markdown
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
EIGHT_DEVICES = {"recipes/sharded-loading.md"}
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="([^"]+)"')
COMMAND = re.compile(r"^\s*bridge\s")
EXIT_STATUS = re.compile(r"#\s*exits (\d+)")
SHOWN_ONLY = re.compile(r"^\s*pip install\s")
"""Shell lines shown but not run: installing needs the network."""
PAGE_TIMEOUT_S = 120
EXAMPLES = ROOT / "examples"


def _snippets_config() -> dict:
    """mkdocs.yml's pymdownx.snippets options, with paths made absolute."""
    extensions = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["markdown_extensions"]
    (config,) = [entry["pymdownx.snippets"] for entry in extensions if "pymdownx.snippets" in entry]
    return {**config, "base_path": [str(ROOT / path) for path in config["base_path"]]}


def page_text(page: str) -> str:
    """The page's Markdown with its snippets included, as mkdocs sees it."""
    renderer = markdown.Markdown(
        extensions=["pymdownx.snippets"],
        extension_configs={"pymdownx.snippets": _snippets_config()},
    )
    lines = (DOCS / page).read_text().split("\n")
    return "\n".join(renderer.preprocessors["snippet"].run(lines))


@dataclasses.dataclass
class Step:
    """One thing a page asks the reader to do."""

    kind: str
    """`python` (a sample, run), `file` (a block titled `title="name"`, written to that
    file for later steps to use) or `command` (one `bridge ...` line of a ```sh block)."""
    body: str
    expected: str | None = None
    """The ```text block right after, if any: what the step prints."""
    name: str = ""


def steps(text: str) -> list[Step]:
    """A page's steps in order. A command's expected output is the ```text block after
    its ```sh block, for the block's last command."""
    fences = list(FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        language, info, body = fence.groups()
        after = fences[index + 1] if index + 1 < len(fences) else None
        expected = None
        if (
            after is not None
            and after.group(1) == "text"
            and not text[fence.end() : after.start()].strip()
        ):
            expected = after.group(3)
        if title := TITLE.search(info):
            found.append(Step("file", body, name=title.group(1)))
        elif language == "python":
            found.append(Step("python", body, expected))
        elif language == "sh":
            commands = [line.strip() for line in body.splitlines() if COMMAND.match(line)]
            found += [Step("command", line) for line in commands]
            if commands:
                found[-1].expected = expected
    return found


def samples(text: str) -> list[tuple[str, str | None]]:
    """`(code, expected output or None)` for each ```python sample of a page, in order."""
    return [(step.body, step.expected) for step in steps(text) if step.kind == "python"]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _run_command(line: str) -> tuple[int, str, str]:
    """A `bridge ...` line through the real entry point, in this process's directory."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", *shlex.split(line, comments=True)[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    return done.returncode, done.stdout, done.stderr


def run_page(page: str) -> dict:
    """Do one page's steps here (in the calling process); report what happened."""
    namespace: dict = {"__name__": "__main__"}
    for number, step in enumerate(steps(page_text(page)), start=1):
        if step.kind == "file":
            Path(step.name).write_text(step.body)
            continue
        out = io.StringIO()
        if step.kind == "command":
            status, printed, errors = _run_command(step.body)
            wanted = int(exits.group(1)) if (exits := EXIT_STATUS.search(step.body)) else 0
            if status != wanted:
                error = f"exit {status}, the page says {wanted}\n{printed}\n{errors}"
                return {"ok": False, "sample": number, "error": error, "code": step.body}
            out.write(printed)
        else:
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(step.body, f"{page} sample {number}", "exec"), namespace)
            except BaseException:
                import traceback

                error = traceback.format_exc()
                return {"ok": False, "sample": number, "error": error, "code": step.body}
        if step.expected is not None and _lines(out.getvalue()) != _lines(step.expected):
            return {
                "ok": False,
                "sample": number,
                "error": f"printed:\n{out.getvalue()}\nthe page shows:\n{step.expected}",
                "code": step.body,
            }
    return {"ok": True}


def offline_cpu_env() -> dict[str, str]:
    """The environment pages and examples run in: no downloads, JAX on the CPU (the
    printed comparisons assume CPU float32 matmuls)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the sharded page and recipe set their own
    return env


def _run_in_process(page: str) -> dict:
    env = offline_cpu_env()
    if page in EIGHT_DEVICES:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), page],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT_S,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"}
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def results() -> dict[str, concurrent.futures.Future]:
    """All pages at once, two processes at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {page: pool.submit(_run_in_process, page) for page in PAGES}


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert PAGES, DOCS
    for page in PAGES:
        assert re.search(rf":\s*{re.escape(page)}\s*$", nav, re.MULTILINE), page


def test_no_sample_is_hidden_from_the_runner():
    """Every ```python fence is one the runner executes or writes (none indented, none
    unclosed), and every shell line is a `bridge` command it runs or an install."""
    for page in PAGES:
        text = page_text(page)
        assert "--8<--" not in text, page
        fences = len(re.findall(r"^[ \t]*```python", text, re.MULTILINE))
        written = [
            fence
            for fence in FENCE.finditer(text)
            if fence.group(1) == "python" and TITLE.search(fence.group(2))
        ]
        assert fences == len(samples(text)) + len(written), page
        for fence in FENCE.finditer(text):
            if fence.group(1) in {"sh", "bash", "console", "shell"}:
                for line in fence.group(3).splitlines():
                    assert COMMAND.match(line) or SHOWN_ONLY.match(line) or not line.strip(), (
                        f"{page}: {line!r} would not run"
                    )


@pytest.mark.parametrize(
    "page", [p for p in PAGES if {s.kind for s in steps(page_text(p))} & {"python", "command"}]
)
def test_page_samples_run(page, results):
    result = results[page].result()
    assert result["ok"], (
        f"{page}, sample {result.get('sample')}:\n{result.get('code', '')}\n{result['error']}"
    )


if __name__ == "__main__":  # one page, in the process test_page_samples_run starts
    sys.path[:0] = [str(ROOT), str(EXAMPLES)]  # the recipes import the example models
    report = run_page(sys.argv[1])
    print(json.dumps(report))
