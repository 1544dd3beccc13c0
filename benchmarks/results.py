"""benchmarks/RESULTS.md: one `## ` section per benchmark, which that benchmark's
`--record` replaces whole, keeping every other section as it was."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
TITLE = "# Benchmark results"


def record(heading: str, body: str) -> None:
    """Write `## heading` and `body` into RESULTS.md, in place of the section of that
    heading if there is one, else at the end."""
    text = RESULTS.read_text() if RESULTS.exists() else TITLE + "\n"
    section = f"## {heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")
