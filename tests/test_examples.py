"""The examples run end to end as a user runs them, and print what the docs show.

Each recipe script runs as `python examples/<script>.py` in a fresh process whose
working directory is empty. The recipe pages include these scripts' code (pymdownx
snippets), and the ```text blocks of a page are the output of its script, in order.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import demo
import pytest
from test_docs import DOCS, EXAMPLES, PAGES, offline_cpu_env, page_text, samples

MODULES = {"nnx_gpt2.py", "mlp_models.py"}
"""Imported by the recipes, not run: they define models and print nothing."""
SCRIPTS = sorted(
    path.name for path in EXAMPLES.glob("*.py") if path.name not in MODULES | {"demo.py"}
)


def page_of(script: str) -> str:
    """The docs page that includes `script`'s sections."""
    (page,) = [page for page in PAGES if f'"{script}:' in (DOCS / page).read_text()]
    return page


def shown_output(page: str) -> list[str]:
    """The lines of the page's expected-output blocks, in order."""
    return [
        line.rstrip()
        for _, expected in samples(page_text(page))
        if expected is not None
        for line in expected.strip("\n").splitlines()
    ]


def _run(script: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[Path]]:
    """The finished run, and what it left in its working directory and its TMPDIR."""
    scratch = cwd / "tmp"
    scratch.mkdir()
    env = {**offline_cpu_env(), "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    ours = scratch.glob("bridge-recipe-*")  # libraries keep caches there too (torch inductor)
    return done, [path for path in cwd.iterdir() if path != scratch] + list(ours)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, concurrent.futures.Future]:
    """Every script at once, two processes at a time, each in an empty directory."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            script: pool.submit(_run, script, tmp_path_factory.mktemp(script)) for script in SCRIPTS
        }


def test_there_is_a_script_for_each_recipe_page():
    recipes = sorted(page for page in PAGES if page.startswith("recipes/"))
    assert sorted(page_of(script) for script in SCRIPTS) == recipes


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipe_script_runs_and_prints_what_its_page_shows(script, runs):
    done, left_behind = runs[script].result()
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    printed = [line.rstrip() for line in done.stdout.strip("\n").splitlines()]
    assert printed, "each recipe shows some output"
    assert printed == shown_output(page_of(script))
    assert left_behind == [], "a script writes in a temporary directory, removed at exit"


def test_demo_runs_and_checks_its_outputs(capsys):
    demo.main()
    printed = capsys.readouterr().out
    assert "Linen output == NNX output: True" in printed
    assert "logits identical: True" in printed
    assert printed.rstrip().endswith("demo passed")
