"""The format registry and its conversion edges, and the search for a route between them.

Formats are nodes; an adapter registers its format (detector, reader, writer) and the
edges it provides. A reader turns an object into a `FlatState`, a writer turns one
back; an edge may transform the flat state on the way (drop what the target cannot
hold, change tensor layout). This module knows no format by name.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from bridge.errors import FormatError, NoRouteError
from bridge.mapping import Rule
from bridge.report import Report
from bridge.tree import TRAINING_FIELDS, FlatState, Leaf, Path, dotted


@dataclasses.dataclass
class Context:
    """What one `convert` / `plan` call knows: its options, template, and report."""

    template: Any = None
    rules: list[Rule] | None = None
    strict: bool = True
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    report: Report = dataclasses.field(default_factory=Report)
    template_flat: FlatState | None = None
    """The template read as a flat state, for edges whose transform depends on it."""
    source: str = ""
    """The source format's name, for writers that lay out a tree the way it was."""
    checkpoint: Checkpoint | None = None
    """How files lay out the template's (or the source object's) tensors, where that
    differs from how it holds them; None: as it holds them."""
    companions: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """Files a directory output gets beside the weights (`config.json`), by name."""
    streaming: bool = False
    """A file is converted into a file: readers hand out lazy arrays and writers take them
    batch by batch (`bridge.stream`), so memory holds a batch, not the model."""
    walks: dict[int, Any] = dataclasses.field(default_factory=dict)
    """What an adapter learned walking an object of this call (by `id`), for its writer
    to reuse: walking a 50,000-leaf NNX graph twice costs as much as the conversion."""

    def satisfies(self) -> frozenset[str]:
        """The edge needs this call meets."""
        have = {"template"} if self.template is not None else set()
        return frozenset(have | ({"path"} if self.options.get("path") is not None else set()))


Reader = Callable[[Any, Context], FlatState]
Writer = Callable[[FlatState, Context], Any]
Description = tuple[str, Any, tuple[int, ...], int]
"""One array as `bridge.inspect` lists it: key (as its format spells it), dtype, shape,
bytes."""
Transform = Callable[[FlatState, Context], FlatState]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The layout a model's files use where it differs from the model's own (a
    transformers model keeps fused, renamed tensors in memory and writes its checkpoint
    names). `from_files` renames a state read from files to the model's names, before
    matching; `to_files` turns a state matched to the model into the files' layout;
    `companions` gives the files written beside the weights (`{name: bytes}`)."""

    to_files: Transform
    from_files: Transform
    companions: Callable[[FlatState, Context], dict[str, bytes]]


@dataclasses.dataclass(frozen=True)
class Format:
    """A node of the graph. `detect` scores how surely an object is of this format
    (0 = not at all, 1 = certain), so that overlapping formats (a plain dict may be Linen
    variables or a pure NNX state) are told apart by confidence, not by registration order.
    """

    name: str
    detect: Callable[[Any], float]
    read: Reader
    write: Writer
    description: str = ""
    spell: Callable[[Path, Leaf], str] = lambda path, leaf: dotted(path)
    options: frozenset[str] = frozenset()
    """The call options its writer takes (`path`: it writes files)."""
    read_options: frozenset[str] = frozenset()
    """The call options its reader (and a route's conversions through it) take: a read
    refuses the writer's (`overwrite=` when nothing is written)."""
    inspect: Reader | None = None
    """Reads keys, shapes and dtypes without array data (placeholder leaves), for
    formats whose `read` would load the arrays; None when `read` already reads nothing."""
    describe: Callable[[Any, Context], Iterable[Description]] | None = None
    """Each array's `Description`, for `bridge.inspect`, said straight from what the format
    stores where that costs less than the leaves `inspect` or `read` make (a path and a
    leaf per tensor, at 50,000 tensors more than the header's checks); None: from those."""
    checkpoint: Callable[[Any], Checkpoint | None] | None = None
    """The files' layout of an object of this format used as template (or as source),
    where it has one of its own (`Checkpoint`)."""
    checkpoint_files: bool = False
    """Whether this format's files take that layout (safetensors: as `save_pretrained`)."""


@dataclasses.dataclass(frozen=True)
class Edge:
    """A registered conversion. `cost` is the fraction of the state's bytes it copies;
    `lossy` says it drops something (`loses` says what); `needs` names the call options it
    requires (`"template"`)."""

    src: str
    dst: str
    cost: float = 0.0
    lossy: bool = False
    needs: frozenset[str] = frozenset()
    loses: str = ""
    transform: Transform | None = None

    def __str__(self) -> str:
        flags = [f"needs {', '.join(sorted(self.needs))}"] if self.needs else []
        flags += [f"lossy: {self.loses or 'drops data'}"] if self.lossy else []
        return f"{self.src} -> {self.dst}" + (f" ({'; '.join(flags)})" if flags else "")


class Graph:
    """Formats and the edges between them."""

    def __init__(self) -> None:
        self.formats: dict[str, Format] = {}
        self.edges: dict[str, dict[str, Edge]] = {}

    def add_format(self, fmt: Format) -> Format:
        if fmt.name in self.formats:
            raise ValueError(f"format {fmt.name!r} is already registered")
        self.formats[fmt.name] = fmt
        self.edges.setdefault(fmt.name, {})
        return fmt

    def add_edge(self, edge: Edge) -> Edge:
        for end in (edge.src, edge.dst):
            if end not in self.formats:
                raise ValueError(f"cannot add edge {edge}: format {end!r} is not registered")
        self.edges[edge.src][edge.dst] = edge
        return edge

    def format(self, name: str) -> Format:
        try:
            return self.formats[name]
        except KeyError:
            raise NoRouteError(
                f"unknown format {name!r}; registered formats: {', '.join(sorted(self.formats))}"
            ) from None

    def detect(self, obj: Any) -> str:
        """The most confident format; a `FormatError` that lists what was tried otherwise."""
        scores = sorted(
            ((fmt.detect(obj), name) for name, fmt in self.formats.items()), reverse=True
        )
        if not scores or scores[0][0] <= 0:
            tried = "\n".join(
                f"  {name}: {fmt.description}" for name, fmt in sorted(self.formats.items())
            )
            raise FormatError(
                f"cannot tell the format of {_describe(obj)}; it is none of:\n{tried}\n"
                "pass source=... if it is one of these in a form bridge does not recognise"
            )
        if len(scores) > 1 and scores[1][0] == scores[0][0]:
            raise FormatError(
                f"{_describe(obj)} could be {scores[0][1]!r} or {scores[1][1]!r}; "
                "pass source=... to choose"
            )
        return scores[0][1]

    def route(self, src: str, dst: str, have: Collection[str] | None = None) -> list[Edge]:
        """The cheapest route from `src` to `dst` using only edges whose needs `have` meets.

        Routes are ordered by (number of lossy edges, bytes copied, hops): a lossy route
        is taken only when no lossless one exists. `have=None` ignores needs.
        """
        self.format(src), self.format(dst)
        found = self._dijkstra(src, dst, have)
        if found is not None:
            return found
        if have is not None and (needy := self._dijkstra(src, dst, None)) is not None:
            missing = sorted({need for edge in needy for need in edge.needs} - set(have))
            raise NoRouteError(
                f"{src} -> {dst} needs {', '.join(missing)}: the route "
                f"{' ; '.join(str(edge) for edge in needy)} requires it; "
                f"pass {', '.join(f'{need}=...' for need in missing)}"
            )
        reach = self._reachable(src, forward=True)
        into = self._reachable(dst, forward=False)
        raise NoRouteError(
            f"no conversion from {src!r} to {dst!r}: {src!r} reaches "
            f"{sorted(reach)} and {dst!r} is reached from {sorted(into)}; a missing edge "
            "from the first set to the second (bridge.register_conversion) would connect them"
        )

    def _dijkstra(self, src: str, dst: str, have: Collection[str] | None) -> list[Edge] | None:
        counter = itertools.count()
        queue: list[tuple[tuple[int, float, int], int, str, list[Edge]]] = [
            ((0, 0.0, 0), next(counter), src, [])
        ]
        settled: set[str] = set()
        while queue:
            (lossy, cost, hops), _, node, path = heapq.heappop(queue)
            if node == dst:
                return path
            if node in settled:
                continue
            settled.add(node)
            for edge in self.edges[node].values():
                if edge.dst in settled or (have is not None and not edge.needs <= set(have)):
                    continue
                key = (lossy + edge.lossy, cost + edge.cost, hops + 1)
                heapq.heappush(queue, (key, next(counter), edge.dst, [*path, edge]))
        return None

    def _reachable(self, start: str, forward: bool) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            node = stack.pop()
            nexts = (
                self.edges[node]
                if forward
                else [src for src, out in self.edges.items() if node in out]
            )
            for other in nexts:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return seen


def _describe(obj: Any) -> str:
    text = (
        repr(obj) if isinstance(obj, str) else f"a {type(obj).__module__}.{type(obj).__qualname__}"
    )
    return text if len(text) < 80 else text[:77] + "..."


GRAPH = Graph()
"""The process-wide graph the public API and the built-in adapters use."""


def register_format(
    name: str,
    *,
    detect: Callable[[Any], float],
    read: Reader,
    write: Writer,
    description: str = "",
    spell: Callable[[Path, Leaf], str] | None = None,
    options: Collection[str] = (),
    read_options: Collection[str] = (),
    inspect: Reader | None = None,
    describe: Callable[[Any, Context], Iterable[Description]] | None = None,
    checkpoint: Callable[[Any], Checkpoint | None] | None = None,
    checkpoint_files: bool = False,
) -> Format:
    """Add a format: `detect(obj)` scores 0..1, `read(obj, ctx)` gives a flat state,
    `write(flat, ctx)` builds the object back; `options` / `read_options` name the call
    options each takes. `inspect(obj, ctx)` gives it without array
    data where `read` would load some; `describe(obj, ctx)` gives each array's key, dtype,
    shape and bytes for `bridge.inspect` where that is cheaper than leaves.
    `checkpoint(obj)` gives the files' layout of an object of this format where it has
    its own (`Checkpoint`); `checkpoint_files` says this format's files take it."""
    fmt = Format(
        name,
        detect,
        read,
        write,
        description,
        options=frozenset(options),
        read_options=frozenset(read_options),
        inspect=inspect,
        describe=describe,
        checkpoint=checkpoint,
        checkpoint_files=checkpoint_files,
    )
    if spell is not None:
        fmt = dataclasses.replace(fmt, spell=spell)
    return GRAPH.add_format(fmt)


def register_conversion(
    src: str,
    dst: str,
    *,
    cost: float = 0.0,
    lossy: bool = False,
    needs: Collection[str] = (),
    loses: str = "",
    transform: Transform | None = None,
) -> Edge:
    """Add an edge `src -> dst`; `transform` edits the flat state on the way (if any)."""
    return GRAPH.add_edge(Edge(src, dst, cost, lossy, frozenset(needs), loses, transform))


def set_aside_training(flat: Mapping[Path, Any], where: str, ctx: Context) -> dict[Path, Any]:
    """The model state of a TrainState's leaves (full paths, collection first): its
    training fields (`step`, `opt_state`) are left out and noted, or kept where the
    caller asks for them (`bridge.migrate` reads with the `training` option)."""
    if ctx.options.get("training"):
        return dict(flat)
    training = [path for path in flat if path[0] in TRAINING_FIELDS]
    ctx.report.note_training_state(where, ["/".join(map(str, path)) for path in training])
    return {path: value for path, value in flat.items() if path[0] not in TRAINING_FIELDS}


def drop_transient(flat: FlatState, ctx: Context) -> FlatState:
    """The lossy step into a format that cannot hold transient state (NNX RNG keys and
    counts: Linen, msgpack); the way back takes it from the template. Reported as
    dropped, never silently."""
    ctx.report.dropped.extend(leaf.source for leaf in flat.values() if leaf.transient)
    return {path: leaf for path, leaf in flat.items() if not leaf.transient}
