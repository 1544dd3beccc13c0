"""Recipe: load and save under `jax.distributed`, two processes on this machine with 4
CPU devices each, one (2, 4) mesh over all 8. docs/recipes/multihost.md walks through it.

    python examples/multihost.py

runs both processes (`python examples/multihost.py PORT INDEX` each) and prints what
process 0 printed. Its files go to a temporary directory, removed at exit.
"""

# --8<-- [start:script]
import os
import signal
import socket
import subprocess
import sys
import tempfile


def worker(port: str, index: str) -> None:
    """One process of the program: the same code runs on every host."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 4 CPU devices
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # on a cluster (SLURM, Cloud TPU, Kubernetes): jax.distributed.initialize()
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(index))

    import numpy as np
    from flax import nnx

    import bridge

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
            bias = nnx.with_partitioning(nnx.initializers.zeros, ("model",))
            self.up = nnx.Linear(16, 8, kernel_init=kernel, bias_init=bias, rngs=rngs)

    mesh = jax.make_mesh((2, 4), ("data", "model"))  # 8 devices, 4 on each process
    template = nnx.merge(*nnx.get_abstract_model(lambda: Model(nnx.Rngs(0)), mesh))

    # each process reads only the slices its own 4 devices hold
    model = bridge.load("model.safetensors", to="nnx", template=template)
    kernel = model.up.kernel.get_value()

    # every process calls save: Orbax writes each process's shards into one checkpoint;
    # safetensors is written by process 0, gathering one array at a time
    bridge.save(model, "checkpoint", format="orbax")
    bridge.save(model, "export.safetensors", format="safetensors")

    restored = bridge.load("checkpoint", to="nnx", template=template).up.kernel.get_value()
    pairs = zip(kernel.addressable_shards, restored.addressable_shards, strict=True)
    same = all(np.array_equal(a.data, b.data) for a, b in pairs)
    if jax.process_index() == 0:  # to a file: gloo's log lines can land inside stdout's
        with open("process0.txt", "w") as report:
            print(jax.process_count(), "processes,", jax.device_count(), "devices", file=report)
            shards = len(kernel.addressable_shards)
            print("kernel", kernel.shape, "shards on this process:", shards, file=report)
            print("Orbax round trip identical:", same, file=report)


def launch() -> str:
    """Both processes on this machine, on a free port; what process 0 reported."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, port, str(index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group of its own, killed whole below
        )
        for index in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=150)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:  # stuck in a barrier: SIGTERM may not end it
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    assert all(worker.returncode == 0 for worker in workers), outputs
    with open("process0.txt") as report:
        return report.read()


if __name__ == "__main__":
    if len(sys.argv) == 3:
        worker(*sys.argv[1:])
    else:
        import numpy as np
        from safetensors.numpy import save_file

        scratch = tempfile.TemporaryDirectory(prefix="bridge-recipe-")  # removed at exit
        os.chdir(scratch.name)
        rng = np.random.default_rng(0)
        weights = {
            "up.weight": rng.normal(size=(8, 16)).astype(np.float32),  # torch: (out, in)
            "up.bias": rng.normal(size=8).astype(np.float32),
        }
        save_file(weights, "model.safetensors", metadata={"format": "pt"})
        print(launch(), end="")
        with open("export.safetensors", "rb") as export, open("model.safetensors", "rb") as file:
            print("export identical to the source file:", export.read() == file.read())
# --8<-- [end:script]
