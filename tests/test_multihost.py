"""Loads and saves under `jax.distributed`: two processes on this machine, 4 CPU devices
each, gloo collectives, one (2, 4) mesh over all 8 devices. The checks run in the
workers (tests/multihost_worker.py); this launches them, ends them whatever happens, and
compares what they report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from multihost_worker import STARTED, llama_state
from safetensors.numpy import save_file

import bridge

WORKER = Path(__file__).with_name("multihost_worker.py")
PROCESSES = 2
TIMEOUT = 150
"""Seconds for the whole run; a worker stuck in a barrier is killed then."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def write_sources(directory: Path) -> dict[str, np.ndarray]:
    """The checkpoint the workers load: one safetensors file (as the safetensors library
    writes it), a HF directory of shards, a .pt file."""
    state = llama_state()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    bridge.save(state, directory / "hf", format="safetensors", max_shard_size="1MB")
    torch.save(
        {key: torch.from_numpy(value) for key, value in state.items()}, directory / "model.pt"
    )
    return state


def launch(directory: Path, processes: int = PROCESSES) -> list[tuple[int | None, str]]:
    """Run the workers to the end or to `TIMEOUT`; (exit code, None if killed, and
    output) of each. Each runs in its own process group, killed whole in the end: a
    process waiting in a barrier may not heed SIGTERM."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    port = str(free_port())
    logs = [directory / f"worker{index}.log" for index in range(processes)]
    workers = []
    try:
        for index, log in enumerate(logs):
            with open(log, "w") as out:
                workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(WORKER),
                            port,
                            str(processes),
                            str(index),
                            str(directory),
                        ],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # until all are done, or one failed
            codes = [worker.poll() for worker in workers]
            if None not in codes or any(codes):
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    return [
        (worker.returncode if worker.returncode >= 0 else None, log.read_text())
        for worker, log in zip(workers, logs, strict=True)
    ]


def test_two_processes_load_and_save_each_touching_only_their_bytes(tmp_path):
    write_sources(tmp_path)
    runs = launch(tmp_path)
    if not all(STARTED in output for _, output in runs):  # never met: another port, once
        runs = launch(tmp_path)
    for code, output in runs:
        assert code == 0, output[-6000:]
    results = [json.loads((tmp_path / f"result{index}.json").read_text()) for index in range(2)]
    for result in results:
        # each process reads what its devices hold: half of every sharded array, all of
        # the replicated norms, once each
        assert result["read model.safetensors"] == result["read hf"] == result["own_bytes"]
        assert result["read model.pt"] == result["own_bytes"]
        replicated = (2 * 4 + 1) * 128 * 4
        assert result["own_bytes"] == (result["total_bytes"] - replicated) // 2 + replicated
        assert result["safetensors identical"] is True
        assert "(6,)" in result["uneven"] and "'w'" in result["uneven"]
    # process 0 wrote the state_dict of the source .pt file (torch.save of gathered arrays)
    assert results[0]["pt identical"] is True
    # process 0 wrote what Flax writes, holding one gathered array at a time
    assert results[0]["msgpack identical"] is True
    assert 0 < results[0]["msgpack peak gathered"] <= results[0]["largest array"]
    # a failure on process 1 is a PeerError on process 0 that names it and says why
    first = results[0]
    for step in ("message orbax", "message safetensors", "message orbax layout"):
        assert "failed on 1 of 2 processes: process 1: FormatError" in first[step], first[step]
    assert "not dtype <U11" in first["message orbax layout"]
    # a failure inside Orbax's own save on one process ends the other's in seconds, not
    # at Orbax's barrier timeout, and leaves nothing behind
    for failing in (1, 0):
        for result in results:
            failure = result[f"orbax failure on {failing}"]
            assert failure["seconds"] < 30 and not failure["left"], failure
        other = results[1 - failing][f"orbax failure on {failing}"]["message"]
        assert f"failed on 1 of 2 processes: process {failing}: OSError" in other, other
