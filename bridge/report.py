"""What a conversion reports: the disagreements that stop it and the changes it made on
purpose. A leaf module: every other module may import it, it imports none of bridge."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Problem:
    """One disagreement between source and target."""

    key: str
    expected: str = ""
    found: str = ""
    nearest: str | None = None

    def __str__(self) -> str:
        text = self.key
        if self.expected:
            text += f": expected {self.expected}"
        if self.found:
            text += f", found {self.found}" if self.expected else f": {self.found}"
        if self.nearest:
            text += f" (did you mean {self.nearest!r}?)"
        return text


@dataclasses.dataclass
class Report:
    """What a conversion could not match, and what it changed on purpose.

    `missing`, `unexpected`, `mismatched` (shape, dtype, kind) and `ambiguous` (two
    sources for one target) are errors: `convert(strict=True)` raises on them.
    `dropped` (leaves a lossy edge left out), `abstract` (target leaves left as
    placeholders under `strict=False`) and `notes` are information.
    """

    missing: list[Problem] = dataclasses.field(default_factory=list)
    unexpected: list[Problem] = dataclasses.field(default_factory=list)
    mismatched: list[Problem] = dataclasses.field(default_factory=list)
    ambiguous: list[Problem] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    abstract: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    subject: str = ""
    """What was converted (`"safetensors 'ckpt/' -> nnx"`), so errors name the input."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.ambiguous)

    def note_kept_on_host(self, keys: Sequence[str]) -> None:
        """Say which 64-bit leaves stay numpy arrays because JAX would narrow them."""
        if keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            self.notes.append(
                f"{len(keys)} 64-bit leaves kept as numpy arrays on the host, exactly: "
                f"{shown} (JAX, with jax_enable_x64 off, would narrow them; enable x64 to "
                "place them on a device, or give a template with 32-bit leaves to narrow "
                "them with every value checked)"
            )

    def note_training_state(self, where: str, keys: Sequence[str]) -> None:
        """Say that a TrainState's training fields were set aside, and where they go."""
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        self.notes.append(
            f"{where}: a Linen TrainState; its training state ({len(keys)} leaves: {shown}) "
            "is set aside, the model state loaded; bridge.migrate(..., optimizer=...) "
            "carries the training state over to an nnx.Optimizer"
        )

    def __str__(self) -> str:
        sections = [
            ("missing from the source", self.missing),
            ("unexpected in the source", self.unexpected),
            ("shape/dtype/kind mismatch", self.mismatched),
            ("ambiguous", self.ambiguous),
            ("dropped (lossy conversion)", self.dropped),
            ("left abstract (no data)", self.abstract),
            ("notes", self.notes),
        ]
        lines = [
            f"{title} ({len(items)}):\n" + "\n".join(f"  {item}" for item in items)
            for title, items in sections
            if items
        ]
        text = "\n".join(lines) if lines else "all leaves matched"
        return f"{self.subject}:\n{text}" if self.subject and not self.ok else text
