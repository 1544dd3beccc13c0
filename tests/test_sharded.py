"""Sharded placement on a simulated 8-device CPU mesh. XLA fixes the device count when
jax starts, so the check runs in a process of its own (`sharded_load.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_each_device_reads_and_holds_only_its_slice(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    script = Path(__file__).with_name("sharded_load.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sharded load ok: 8 slice reads of up.weight" in done.stdout
