"""bridge: convert model state between PyTorch, Flax NNX, Flax Linen, Orbax and msgpack."""

from importlib.metadata import PackageNotFoundError, version

from bridge import formats  # the adapters: importing them registers the built-in formats
from bridge.api import (
    Inspection,
    Plan,
    PlanRow,
    conversions,
    convert,
    detect,
    inspect,
    load,
    plan,
    registered_formats,
    route,
    save,
    suggest_rules,
)
from bridge.errors import (
    BridgeError,
    FormatError,
    MismatchError,
    NoRouteError,
    OutputExistsError,
    PeerError,
)
from bridge.graph import Context, Edge, Format, register_conversion, register_format
from bridge.mapping import Merge, Rule, Split, Stack, Unstack
from bridge.migration import migrate
from bridge.report import Problem, Report
from bridge.suggest import Pairing, Suggestion, Tie
from bridge.tree import FlatState, Leaf, Path

try:
    __version__ = version("state-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "BridgeError",
    "Context",
    "Edge",
    "FlatState",
    "Format",
    "FormatError",
    "Inspection",
    "Leaf",
    "Merge",
    "MismatchError",
    "NoRouteError",
    "OutputExistsError",
    "Pairing",
    "Path",
    "PeerError",
    "Plan",
    "PlanRow",
    "Problem",
    "Report",
    "Rule",
    "Split",
    "Stack",
    "Suggestion",
    "Tie",
    "Unstack",
    "__version__",
    "conversions",
    "convert",
    "detect",
    "formats",
    "inspect",
    "load",
    "migrate",
    "plan",
    "register_conversion",
    "register_format",
    "registered_formats",
    "route",
    "save",
    "suggest_rules",
]
