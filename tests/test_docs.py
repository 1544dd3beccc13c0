"""Every Python sample of the documentation runs, and prints what the page shows.

Pages are read as mkdocs renders them: `--8<--` includes of the examples' code are
expanded by pymdownx.snippets itself, configured as in mkdocs.yml. Each page's
```python blocks run in order, in one namespace, in a process of their own
whose working directory is a fresh temporary directory: a page's samples are
self-contained and build what they need offline. A ```text block right after a
```python block is that block's expected output, compared line by line. The sharded
loading page runs with 8 simulated CPU devices (XLA fixes the count when jax starts).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
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
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
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


def samples(text: str) -> list[tuple[str, str | None]]:
    """`(code, expected output or None)` for each ```python block of a page, in order."""
    fences = list(FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        expected = None
        after = fences[index + 1] if index + 1 < len(fences) else None
        if (
            after is not None
            and after.group(1) == "text"
            and not text[fence.end() : after.start()].strip()
        ):
            expected = after.group(2)
        found.append((fence.group(2), expected))
    return found


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def run_page(page: str) -> dict:
    """Run one page's samples here (in the calling process); report what happened."""
    namespace: dict = {"__name__": "__main__"}
    for number, (code, expected) in enumerate(samples(page_text(page)), start=1):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{page} sample {number}", "exec"), namespace)
        except BaseException:
            import traceback

            return {"ok": False, "sample": number, "error": traceback.format_exc(), "code": code}
        if expected is not None and _lines(out.getvalue()) != _lines(expected):
            return {
                "ok": False,
                "sample": number,
                "error": f"printed:\n{out.getvalue()}\nthe page shows:\n{expected}",
                "code": code,
            }
    return {"ok": True}


def _run_in_process(page: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["JAX_PLATFORMS"] = "cpu"
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


def test_no_python_sample_is_hidden_from_the_runner():
    """Every ```python fence is one the runner executes (none indented, none unclosed)."""
    for page in PAGES:
        text = page_text(page)
        fences = len(re.findall(r"^[ \t]*```python", text, re.MULTILINE))
        assert fences == len(samples(text)), page


@pytest.mark.parametrize("page", [p for p in PAGES if samples(page_text(p))])
def test_page_samples_run(page, results):
    result = results[page].result()
    assert result["ok"], (
        f"{page}, sample {result.get('sample')}:\n{result.get('code', '')}\n{result['error']}"
    )


if __name__ == "__main__":  # one page, in the process test_page_samples_run starts
    sys.path[:0] = [str(ROOT), str(EXAMPLES)]  # the recipes import the example models
    report = run_page(sys.argv[1])
    print(json.dumps(report))
