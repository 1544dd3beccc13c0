"""benchmarks/RESULTS.md: one `## ` section per benchmark command, which that command's
`--record` replaces whole, keeping every other section (and the hand-written notes
sections) as they were."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
TITLE = "# Benchmark results"


def command() -> str:
    """The command line that ran this benchmark, `--record` left out."""
    script = Path(sys.argv[0]).name
    return shlex.join(
        ["python", f"benchmarks/{script}", *(a for a in sys.argv[1:] if a != "--record")]
    )


def record(title: str, body: str) -> None:
    """Write `body` into RESULTS.md under `## title: `command``, in place of that
    section if the same command recorded one, else at the end."""
    heading = f"## {title}: `{command()}`"
    text = RESULTS.read_text() if RESULTS.exists() else TITLE + "\n"
    section = f"{heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")
