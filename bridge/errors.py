"""The exception hierarchy: every failure a user can cause is a `BridgeError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.report import Report


class BridgeError(Exception):
    """Base of every error `bridge` raises on purpose."""


class FormatError(BridgeError, ValueError):
    """The input is of no known format, or is corrupt, or cannot hold what is asked."""


class OutputExistsError(BridgeError, FileExistsError):
    """The output path holds what a save must not replace: an output, without
    `overwrite=True`; a directory where a file goes or a file where a directory goes."""


class NoRouteError(BridgeError):
    """No chain of registered conversions leads from the source to the target format."""


class MismatchError(BridgeError):
    """Source and target disagree: missing, unexpected or wrongly shaped leaves.

    `report` holds every disagreement, so a caller can inspect them all at once.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(str(report))


class PeerError(BridgeError):
    """Another process of a `jax.distributed` program failed in a step that all processes
    take together (a save): this one stops too, instead of waiting for it."""
