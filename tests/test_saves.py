"""Saving: an output appears whole or not at all, and nothing bridge did not write is lost.

A HF directory is updated as `save_pretrained` updates it: weight files and index
replaced, stale shards removed, every other file kept. At every step of a save (each
step snapshotted as a crash there would leave it, each step made to fail, the process
killed) the directory loads the old weights or the new ones, never a mix, for bridge and
for the `safetensors` package alike. A directory never becomes a file, nor a file a
directory; an output that appears while saving is kept without `overwrite`; temporaries
of a killed save are swept by the next save to the same place, and nothing else is.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from conftest import make_nnx_net

import bridge
from bridge.graph import GRAPH

if "torch" not in GRAPH.formats:  # the edges to torch need the torch format registered
    importlib.import_module("bridge.formats.torch")
atomic = importlib.import_module("bridge.atomic")

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_NAME = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")
LEFTOVER = re.compile(r"\..+\.[0-9a-f]{8}\.tmp|.*\.orbax-checkpoint-tmp.*")
"""bridge's temporaries (`.{name}.{token}.tmp`) and Orbax's own."""
SHARD_BYTES = 20_000  # one (64, 64) float32 tensor per shard: four shards
Canonical = dict[str, tuple[str, tuple[int, ...], bytes]]


def _state(fill: float, *, n: int = 4) -> dict[str, np.ndarray]:
    """`n` float32 tensors, each a different value: loading a mix of two states shows."""
    return {f"h.{i}.weight": np.full((64, 64), fill + i, np.float32) for i in range(n)}


def _save(state: Any, path: Path | str, **options: Any) -> Path:
    return bridge.save(state, path, format="safetensors", source="torch", **options)


def _canonical(state: Mapping[str, torch.Tensor | np.ndarray]) -> Canonical:
    """Each tensor as (dtype, shape, bytes): equal means equal bit for bit."""
    out = {}
    for key, value in state.items():
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[key] = (str(tensor.dtype), tuple(tensor.shape), data)
    return out


def _hf_directory(directory: Path) -> dict[str, bytes]:
    """What `save_pretrained` and a user put next to the weights; returns those files."""
    transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0
    ).save_pretrained(directory)
    transformers.GenerationConfig(max_new_tokens=5).save_pretrained(directory)
    (directory / "README.md").write_text("# a model\n")
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (directory / "pytorch_model.bin").write_bytes(b"weights of another format")
    (directory / "adapter_model.safetensors").write_bytes(b"not listed, not a shard name")
    (directory / "model.safetensors.bak").write_bytes(b"a user's backup")
    return _others(directory)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file but temporaries, by relative path."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not LEFTOVER.fullmatch(path.name)
    }


def _others(directory: Path) -> dict[str, bytes]:
    """Every file but weight files and temporaries."""
    return {
        name: data for name, data in _files(directory).items() if not WEIGHT_NAME.fullmatch(name)
    }


def _weight_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if WEIGHT_NAME.fullmatch(p.name))


def _leftovers(root: Path) -> list[str]:
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if LEFTOVER.fullmatch(path.name)
    )


def _read_with_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """The directory read as `from_pretrained` reads it, with the `safetensors` package."""
    if (directory / "model.safetensors").is_file():
        return safetensors.torch.load_file(directory / "model.safetensors")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(index["weight_map"].values()):
        tensors.update(safetensors.torch.load_file(directory / name))
    return tensors


def _outcome(directory: Path, states: Mapping[str, Canonical]) -> set[str]:
    """What bridge and the safetensors package load from `directory`: the name of one of
    `states`, "refused", or "mix"."""

    def name(read: Callable[[], Mapping[str, Any]], errors: tuple[type, ...]) -> str:
        try:
            loaded = _canonical(read())
        except errors:
            return "refused"
        return next((name for name, state in states.items() if state == loaded), "mix")

    return {
        name(lambda: bridge.convert(str(directory), to="torch"), (bridge.BridgeError,)),
        name(lambda: _read_with_safetensors(directory), (Exception,)),
    }


class _Steps:
    """Calls `on_step(k, args)` before the k-th call of any function that changes which
    files a directory holds (renames, links, removals), as a crash right there would see
    it; `args` are the call's."""

    FUNCTIONS = ("replace", "rename", "link", "unlink", "rmdir")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, on_step: Callable[..., None]) -> None:
        self.count = 0
        self.busy = False
        for name in self.FUNCTIONS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), on_step))
        native = getattr(atomic, "_renameat2", None)
        if native is not None:
            monkeypatch.setattr(atomic, "_renameat2", self._wrap(native, on_step))

    def _wrap(self, function: Callable[..., Any], on_step: Callable[..., None]) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self.busy:
                self.count += 1
                self.busy = True
                try:
                    on_step(self.count, args)
                finally:
                    self.busy = False
            return function(*args, **kwargs)

        return wrapped


def _without_renameat2_or_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable fallback: no renameat2 (not Linux, or a filesystem without its flags)
    and no hard links (FAT, some network and FUSE filesystems)."""
    monkeypatch.setattr(atomic, "_renameat2", lambda *args: False, raising=False)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(1, "hard links are not supported here")

    monkeypatch.setattr(os, "link", no_link)


# --- the save_pretrained workflow --------------------------------------------------------


def test_weights_go_into_a_save_pretrained_directory_without_overwrite(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path / "gpt2"
    config.save_pretrained(directory)
    transformers.GenerationConfig(max_new_tokens=5).save_pretrained(directory)
    (directory / "README.md").write_text("# gpt2\n")
    others = _files(directory)

    bridge.save(model, directory, format="safetensors")

    assert _others(directory) == others
    assert _weight_files(directory) == ["model.safetensors"]
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


FOUR_SHARDS = [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]
TWO_SHARDS = [f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)]
INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("old", "new", "written"),
    [
        (None, None, ["model.safetensors"]),
        (SHARD_BYTES, None, ["model.safetensors"]),
        (None, SHARD_BYTES, [*FOUR_SHARDS, INDEX]),
        (SHARD_BYTES, 2 * SHARD_BYTES, [*TWO_SHARDS, INDEX]),
    ],
    ids=["single-single", "shards-single", "single-shards", "4shards-2shards"],
)
def test_weights_already_there_need_overwrite_and_only_they_are_replaced(
    tmp_path, old, new, written
):
    directory = tmp_path / "model"
    _save(_state(1.0), directory, max_shard_size=old)
    others = _hf_directory(directory)
    before = _files(directory)

    with pytest.raises(bridge.OutputExistsError, match=r"model.*overwrite=True"):
        _save(_state(10.0), directory, max_shard_size=new)
    assert _files(directory) == before

    _save(_state(10.0), directory, max_shard_size=new, overwrite=True)
    assert _outcome(directory, {"new": _canonical(_state(10.0))}) == {"new"}
    assert _others(directory) == others
    assert _weight_files(directory) == written  # no stale shard, no stale index
    assert _leftovers(tmp_path) == []


def test_shards_an_old_index_lists_under_other_names_are_removed_with_it(tmp_path):
    directory = tmp_path / "model"
    others = _hf_directory(directory)
    weight_map = {}
    for part, (key, value) in zip("ab", _state(1.0, n=2).items(), strict=True):
        safetensors.torch.save_file(
            {key: torch.from_numpy(value)}, directory / f"w-{part}.safetensors"
        )
        weight_map[key] = f"w-{part}.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    _save(_state(10.0), directory, overwrite=True)

    assert _others(directory) == others
    assert sorted(p.name for p in directory.glob("*.safetensors*")) == [
        "adapter_model.safetensors",
        "model.safetensors",
        "model.safetensors.bak",
    ]


@pytest.mark.parametrize(
    ("old", "new"),
    [(None, None), (SHARD_BYTES, SHARD_BYTES // 2), (SHARD_BYTES, SHARD_BYTES), (None, 8_000)],
    ids=["single", "same-shard-names", "fewer-shards", "single-to-shards"],
)
def test_an_hf_directory_is_cast_in_place_keeping_its_other_files(tmp_path, old, new):
    directory = tmp_path / "model"
    source = {k: v + np.float32(0.1234567) for k, v in _state(1.0).items()}  # not bf16-exact
    _save(source, directory, max_shard_size=old)
    others = _hf_directory(directory)
    expected = _canonical({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in source.items()})

    bridge.save(
        directory,
        directory,
        format="safetensors",
        dtype="bfloat16",
        max_shard_size=new,
        overwrite=True,
    )

    assert _outcome(directory, {"cast": expected}) == {"cast"}
    assert _others(directory) == others
    assert _leftovers(tmp_path) == []


def test_weights_can_be_saved_into_the_current_directory(tmp_path, monkeypatch):
    others = _hf_directory(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _save(_state(1.0), ".") == Path(".")
    assert _outcome(tmp_path, {"saved": _canonical(_state(1.0))}) == {"saved"}
    assert _others(tmp_path) == others


# --- a directory never becomes a file, nor a file a directory ------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("contents", ["empty", "with-files"])
@pytest.mark.parametrize(
    ("format", "name"), [("msgpack", "out.msgpack"), ("safetensors", "out.safetensors")]
)
def test_a_directory_never_becomes_a_file(tmp_path, format, name, contents, overwrite):
    target = tmp_path / name
    target.mkdir()
    if contents == "with-files":
        (target / "config.json").write_text("{}")
    before = _files(tmp_path)
    with pytest.raises(bridge.OutputExistsError, match="is a directory"):
        bridge.save(
            {"params": {"w": np.ones(2, np.float32)}}, target, format=format, overwrite=overwrite
        )
    assert target.is_dir() and _files(tmp_path) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("format", ["safetensors", "orbax"])
def test_a_file_never_becomes_a_directory(tmp_path, format, overwrite):
    target = tmp_path / "out"
    target.write_bytes(b"a file of someone's")
    with pytest.raises(bridge.OutputExistsError, match="is a file"):
        bridge.save(
            {"params": {"w": np.ones(2, np.float32)}}, target, format=format, overwrite=overwrite
        )
    assert target.read_bytes() == b"a file of someone's"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("format", "path"),
    [
        ("msgpack", "."),
        ("orbax", "."),
        ("orbax", ".."),
        ("msgpack", "a_file/x.msgpack"),
        ("safetensors", "a_file/x.safetensors"),
        ("safetensors", "a_file/hf"),
        ("safetensors", "a_file/deeper/hf"),
        ("orbax", "a_file/ckpt"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_dot_and_paths_under_a_file_are_refused_with_a_bridge_error(
    tmp_path, monkeypatch, format, path, overwrite
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a_file").write_bytes(b"data")
    (work / "keep.txt").write_text("kept")
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    with pytest.raises(bridge.BridgeError, match=r"a_file.* is a file|is a directory|own name"):
        bridge.save(
            {"params": {"w": np.ones(2, np.float32)}}, path, format=format, overwrite=overwrite
        )
    assert _files(tmp_path) == before
    assert _leftovers(tmp_path) == []


# --- no replacing without overwrite, even at the last moment --------------------------------


def _their_output(path: Path) -> None:
    """Another writer's output, made at `path` as a directory or a file like bridge's."""
    if path.suffix:
        path.write_bytes(b"theirs")
    else:
        path.mkdir()
        (path / "theirs.txt").write_text("theirs")


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "fallback"])
@pytest.mark.parametrize(
    ("format", "name", "appears"),
    [
        ("msgpack", "out.msgpack", "out.msgpack"),
        ("safetensors", "out.safetensors", "out.safetensors"),
        ("safetensors", "hf", "hf/model.safetensors"),
        ("orbax", "ckpt", "ckpt"),
    ],
)
def test_an_output_that_appears_before_the_move_is_kept_without_overwrite(
    tmp_path, monkeypatch, format, name, appears, fallback
):
    """Another writer creates the output between bridge's check and its move: each move
    onto the output lets the other writer win first; bridge must refuse, not replace."""
    if fallback:
        _without_renameat2_or_hard_links(monkeypatch)
    contested = tmp_path / appears
    if contested.parent != tmp_path:
        contested.parent.mkdir()

    def other_writer_first(step: int, args: tuple) -> None:
        if args[1:2] == (contested,) and not os.path.lexists(contested):
            _their_output(contested)

    _Steps(monkeypatch, other_writer_first)
    with pytest.raises(bridge.OutputExistsError, match="overwrite=True"):
        bridge.save({"params": {"w": np.ones(2, np.float32)}}, tmp_path / name, format=format)
    monkeypatch.undo()
    if contested.is_dir():
        assert _files(contested) == {"theirs.txt": b"theirs"}
    else:
        assert contested.read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


# --- crash safety of a directory save -----------------------------------------------------

SCENARIOS = {  # old max_shard_size, new max_shard_size
    "same-shard-names": (SHARD_BYTES, SHARD_BYTES),
    "single-to-shards": (None, SHARD_BYTES),
    "shards-to-single": (SHARD_BYTES, None),
    "other-shard-count": (SHARD_BYTES, 2 * SHARD_BYTES),
    "single-to-single": (None, None),
}
STATES = {"old": _canonical(_state(1.0)), "new": _canonical(_state(10.0))}


def _old_output(directory: Path, old: int | None) -> dict[str, bytes]:
    _save(_state(1.0), directory, max_shard_size=old)
    return _hf_directory(directory)


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_instant_of_a_directory_save_loads_the_old_or_the_new_weights(
    tmp_path, monkeypatch, scenario, fallback
):
    """A copy of the directory before each step is what a SIGKILL there leaves."""
    old, new = SCENARIOS[scenario]
    directory = tmp_path / "model"
    others = _old_output(directory, old)
    snapshots = tmp_path / "snapshots"
    if fallback:
        _without_renameat2_or_hard_links(monkeypatch)

    def snapshot(step: int, args: tuple) -> None:
        copy = snapshots / f"{step:03d}"
        if directory.is_dir():
            shutil.copytree(directory, copy)
        else:  # a crash here leaves no directory at all
            copy.mkdir(parents=True)

    _Steps(monkeypatch, snapshot)
    _save(_state(10.0), directory, max_shard_size=new, overwrite=True)
    monkeypatch.undo()

    seen = {}
    for copy in [*sorted(snapshots.iterdir()), directory]:
        outcome = _outcome(copy, STATES)
        assert "mix" not in outcome, copy.name
        assert outcome <= ({"old", "new", "refused"} if fallback else {"old", "new"}), copy.name
        assert _others(copy) == others, copy.name
        seen[copy.name] = outcome
    assert seen[sorted(snapshots.iterdir())[0].name] == {"old"}
    assert seen["model"] == {"new"}
    assert _leftovers(directory) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_failure_at_any_step_leaves_the_old_or_the_new_weights(
    tmp_path, monkeypatch, scenario, fallback
):
    old, new = SCENARIOS[scenario]
    step = 0
    while True:
        step += 1
        directory = tmp_path / f"{step:03d}" / "model"
        others = _old_output(directory, old)
        with monkeypatch.context() as patch:
            if fallback:
                _without_renameat2_or_hard_links(patch)

            def fail(count: int, args: tuple, step: int = step) -> None:
                if count == step:
                    raise OSError(f"injected failure at step {step}")

            _Steps(patch, fail)
            try:
                _save(_state(10.0), directory, max_shard_size=new, overwrite=True)
            except OSError as error:
                assert str(error) == f"injected failure at step {step}"
                failed = True
            else:
                failed = False
        outcome = _outcome(directory, STATES)
        assert "mix" not in outcome, step
        assert outcome <= ({"old", "new", "refused"} if fallback else {"old", "new"}), step
        assert _others(directory) == others, step
        if not failed:
            assert outcome == {"new"} and _leftovers(directory.parent) == []
            break
        # whatever the failure left, the next save completes and leaves nothing behind
        _save(_state(10.0), directory, max_shard_size=new, overwrite=True)
        assert _outcome(directory, STATES) == {"new"}, step
        assert _others(directory) == others and _leftovers(directory.parent) == [], step
    assert step > 1  # at least one step was made to fail


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }


def _wait_for_line(process: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if line.strip() != expected:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"expected {expected!r} from the subprocess, got {line!r}\n{err}")


SAVE_LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import bridge

    states = [
        {f"h.{i}.weight": np.full((512, 512), fill + i, np.float32) for i in range(4)}
        for fill in (10.0, 1.0)
    ]
    print("ready", flush=True)
    for turn in range(10**6):
        bridge.save(
            states[turn % 2], sys.argv[1], format="safetensors", source="torch",
            max_shard_size=1_100_000, overwrite=True,
        )
    """
)


def test_a_killed_directory_save_leaves_the_old_or_the_new_weights(tmp_path):
    """Processes saving two states in turn into an HF directory, SIGKILLed at random."""
    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP)

    def state(fill: float) -> dict[str, np.ndarray]:  # as the script's: four 1 MB shards
        return {f"h.{i}.weight": np.full((512, 512), fill + i, np.float32) for i in range(4)}

    states = {"new": _canonical(state(10.0)), "old": _canonical(state(1.0))}
    directories, processes = [], []
    for run in range(3):
        directory = tmp_path / f"run{run}" / "model"
        _save(state(1.0), directory, max_shard_size=1_100_000)
        _hf_directory(directory)
        directories.append((directory, _others(directory)))
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), str(directory)],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    delays = random.Random(0)
    for process in processes:
        _wait_for_line(process, "ready")
    for process in processes:
        time.sleep(delays.uniform(0.3, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    for directory, others in directories:
        assert _outcome(directory, states) <= {"old", "new"}
        assert _others(directory) == others
        _save(_state(5.0), directory, overwrite=True)  # the next save sweeps what was left
        assert _outcome(directory, {"last": _canonical(_state(5.0))}) == {"last"}
        assert _others(directory) == others
        assert _leftovers(directory.parent) == []


STUCK_SAVES = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    import numpy as np
    import orbax.checkpoint as ocp
    import bridge
    from bridge.graph import GRAPH, Context
    from bridge.tree import LazyArray, Leaf

    root = Path(sys.argv[1])
    stuck = threading.Semaphore(0)


    class Stuck(LazyArray):  # a tensor whose reading never ends: the save is killed there
        shape, dtype = (10,), np.dtype(np.float32)

        def read(self, index=...):
            stuck.release()
            time.sleep(3600)


    orbax_save = ocp.StandardCheckpointer.save


    def save_then_hang(self, *args, **kwargs):  # Orbax reads every array before it saves
        orbax_save(self, *args, **kwargs)
        self.wait_until_finished()
        stuck.release()
        time.sleep(3600)


    ocp.StandardCheckpointer.save = save_then_hang
    big = np.ones(1_000_000, np.float32)


    def write(format, name, **options):
        flat = {("a", "weight"): Leaf(big), ("b", "weight"): Leaf(Stuck())}
        options = {"path": root / name, "overwrite": True, **options}
        GRAPH.format(format).write(flat, Context(source="torch", options=options))


    jobs = [
        lambda: write("safetensors", "weights.safetensors"),
        lambda: write("safetensors", "hf", max_shard_size=1_000_000),
        lambda: write("safetensors", "hf_new"),
        lambda: write("msgpack", "ckpt.msgpack"),
        lambda: bridge.save({"params": {"w": big}}, root / "ckpt", format="orbax", overwrite=True),
    ]
    for job in jobs:
        threading.Thread(target=job, daemon=True).start()
    for job in jobs:
        stuck.acquire()
    print("stuck", flush=True)
    time.sleep(3600)
    """
)


def test_temporaries_of_a_killed_save_are_swept_by_the_next_save_to_the_same_place(tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    old = {"params": {"w": np.zeros(3, np.float32)}}
    for format, name in [
        ("safetensors", "weights.safetensors"),
        ("msgpack", "ckpt.msgpack"),
        ("orbax", "ckpt"),
    ]:
        bridge.save(old, root / name, format=format)
    _save(_state(1.0), root / "hf", max_shard_size=SHARD_BYTES)
    others = _hf_directory(root / "hf")
    before = {
        name: _files(root / name) if (root / name).is_dir() else (root / name).read_bytes()
        for name in ("weights.safetensors", "ckpt.msgpack", "ckpt", "hf")
    }
    script = tmp_path / "stuck_saves.py"
    script.write_text(STUCK_SAVES)
    process = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_line(process, "stuck")
    process.send_signal(signal.SIGKILL)
    process.wait()

    after = {
        name: _files(root / name) if (root / name).is_dir() else (root / name).read_bytes()
        for name in before
    }
    assert after == before  # a killed save leaves the old outputs as they were
    left = _leftovers(root)
    for name in ("weights.safetensors", "ckpt.msgpack", "ckpt", "hf", "hf_new"):
        assert any(name in entry for entry in left), (name, left)
    assert not (root / "hf_new").exists()  # a new directory appears whole or not at all

    new = {"params": {"w": np.ones(3, np.float32)}}
    for format, name in [
        ("safetensors", "weights.safetensors"),
        ("msgpack", "ckpt.msgpack"),
        ("orbax", "ckpt"),
    ]:
        bridge.save(new, root / name, format=format, overwrite=True)
    _save(_state(10.0), root / "hf", overwrite=True)
    new_others = _hf_directory(root / "hf_new")  # made meanwhile, by save_pretrained say
    _save(_state(10.0), root / "hf_new")
    assert _leftovers(root) == []
    assert _others(root / "hf_new") == new_others
    assert _others(root / "hf") == others


def test_the_sweep_removes_only_bridge_temporaries_whose_owner_is_gone(tmp_path):
    target = tmp_path / "out.msgpack"
    important = tmp_path / "important"
    important.mkdir()
    (important / "data").write_text("precious")
    entries = {
        ".out.msgpack.0123abcd.tmp": "abandoned",  # bridge's name, owner gone: swept
        ".out.msgpack.4567cdef.tmp": "in use",  # bridge's name, its lock held: kept
        ".out.msgpack.0123abcd.old": "other suffix",
        ".out.msgpack.xyz.tmp": "not a token",
        ".other.msgpack.0123abcd.tmp": "another output's",
        "out.msgpack.0123abcd.tmp": "not hidden",
        ".out.msgpack.0123ABCD.tmp": "not bridge's token spelling",
    }
    for name, text in entries.items():
        (tmp_path / name).write_text(text)
    (tmp_path / ".out.msgpack.89abcdef.tmp").symlink_to(important)  # never followed
    abandoned_dir = tmp_path / ".out.msgpack.feedf00d.tmp"  # a directory temporary: swept
    abandoned_dir.mkdir()
    (abandoned_dir / "out.msgpack").write_bytes(b"half")
    in_use = open(tmp_path / ".out.msgpack.4567cdef.tmp", "rb")  # noqa: SIM115
    fcntl.flock(in_use, fcntl.LOCK_EX)
    try:
        bridge.save({"params": {"w": np.ones(2, np.float32)}}, target, format="msgpack")
    finally:
        in_use.close()
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == (set(entries) - {".out.msgpack.0123abcd.tmp"}) | {
        "important",
        "out.msgpack",
        ".out.msgpack.89abcdef.tmp",
    }
    assert (important / "data").read_text() == "precious"


def test_a_directory_save_sweeps_only_weight_temporaries_its_index_does_not_use(tmp_path):
    directory = tmp_path / "model"
    _save(_state(1.0), directory, max_shard_size=SHARD_BYTES)
    others = _hf_directory(directory)
    (directory / ".model-00009-of-00009.safetensors.0123abcd.tmp").write_bytes(b"abandoned")
    (directory / ".config.json.0123abcd.tmp").write_bytes(b"not a weight file's")
    _save(_state(10.0), directory, max_shard_size=SHARD_BYTES, overwrite=True)
    assert _leftovers(directory) == [".config.json.0123abcd.tmp"]
    assert _others(directory) == others


# --- Orbax: a checkpoint directory is one unit ----------------------------------------------


def test_an_orbax_checkpoint_is_swapped_whole_and_never_absent(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    bridge.save({"params": {"w": np.zeros(3, np.float32)}}, target, format="orbax")
    (target / "notes.txt").write_text("inside the checkpoint: replaced with it")
    old = _files(target)
    seen = []

    def look(step: int, args: tuple) -> None:
        seen.append(_files(target) if target.is_dir() else None)

    _Steps(monkeypatch, look)
    bridge.save({"params": {"w": np.ones(3, np.float32)}}, target, format="orbax", overwrite=True)
    monkeypatch.undo()
    new = _files(target)
    assert "notes.txt" not in new
    assert all(files in (old, new) for files in seen)
    restored = bridge.convert(str(target), to="linen")
    assert restored["params"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["safetensors", "orbax", "msgpack", "torch"])
@pytest.mark.parametrize("option", ["overwrite", "path", "max_shard_size"])
def test_a_writer_option_is_refused_where_nothing_of_that_format_is_written(tmp_path, fmt, option):
    """Reading a file takes its reader's options only: `overwrite=True` on a load would
    promise something no step does."""
    file = tmp_path / {
        "safetensors": "net.safetensors",
        "msgpack": "net.msgpack",
        "torch": "net.pt",
    }.get(fmt, "net")
    bridge.save(make_nnx_net(), file, format=fmt)
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \['{option}'\]"):
        bridge.convert(str(file), to="linen", **{option: "x"})
    known = bridge.registered_formats()[fmt]
    assert option not in known.read_options
    if option != "max_shard_size" or fmt == "safetensors":
        assert option in known.options  # still the writer's
