# One command each: the targets create the virtual environment they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on the development and CI machines; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# The lowest Flax release pyproject admits (it still spells the partitioning key
# `sharding_names`); `make test` repeats the Flax-facing tests on it.
FLAX_MIN := flax==0.12.1
FLAX_MIN_VENV := .venv-flax-min
# The last transformers series with Flax models: `make test` checks bridge's torch ->
# Linen conversion of 12 architectures against its own converter (tests/test_hf4_peer.py),
# and that exports in the Hub's layout load in it (tests/test_hub_layout.py).
HF4_PINS := transformers==4.57.3 flax==0.12.8 jax==0.10.2 jaxlib==0.10.2
HF4_VENV := .venv-hf4

.PHONY: demo test test-flax-min test-hf4 lint docs bench bench-leaves bench-large bench-multihost clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[torch,dev,docs]'
	touch $@

$(FLAX_MIN_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLAX_MIN_VENV)
	$(FLAX_MIN_VENV)/bin/pip install -q --upgrade pip
	$(FLAX_MIN_VENV)/bin/pip install -q '$(FLAX_MIN)' -e '.' pytest hypothesis
	touch $@

# torch first, pinned: transformers would otherwise pull an unpinned (CUDA) build.
$(HF4_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/pip install -q --upgrade pip
	$(HF4_VENV)/bin/pip install -q $(TORCH_PIN)
	$(HF4_VENV)/bin/pip install -q $(TORCH_PIN) $(HF4_PINS) -e '.' pytest hypothesis
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

test: $(BIN)/.installed test-flax-min test-hf4
	$(BIN)/python -m pytest -q

test-flax-min: $(FLAX_MIN_VENV)/bin/.installed
	$(FLAX_MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider -m flax_compat \
		$(shell grep -l "pytest.mark.flax_compat" tests/test_*.py)

# tests/test_hub_layout.py drives transformers 5 (the main environment) from 4.57's.
test-hf4: $(HF4_VENV)/bin/.installed $(BIN)/.installed
	BRIDGE_HF5_PYTHON=$(abspath $(BIN)/python) $(HF4_VENV)/bin/python -m pytest -q --tb=short \
		-p no:cacheprovider -m hf4 tests/test_hf4_peer.py tests/test_hub_layout.py

# Speed and memory against the common recipes and the floor (benchmarks/RESULTS.md).
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_load.py --size-gb 1.0 --record
	$(BIN)/python benchmarks/bench_files.py --size-gb 1.0 --record

# Per-leaf cost at 1k / 10k / 50k small leaves against the do-it-yourself pytree code,
# appended to benchmarks/RESULTS.md.
bench-leaves: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_leaves.py --record

# A checkpoint of about 60% of this machine's memory, in 1 GB shards: a loader holding
# two copies cannot load it; it is converted to Orbax and back in batches. Not part of CI.
LARGE_GB = $$($(BIN)/python -c "import os; print(round(0.6 * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9, 1))")
bench-large: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_load.py --methods bridge --dtypes float32 --shard-gb 1 --repeat 1 \
		--size-gb $(LARGE_GB)
	$(BIN)/python benchmarks/bench_files.py --cases st_to_orbax orbax_to_st --shard-gb 1 --repeat 1 \
		--size-gb $(LARGE_GB)

# 1 process of 8 CPU devices against 2 of 4 (jax.distributed on localhost, gloo): wall
# time, bytes read per process, save and load times (benchmarks/RESULTS.md).
bench-multihost: $(BIN)/.installed
	$(BIN)/python benchmarks/multihost.py --size-mb 256 --record

docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(FLAX_MIN_VENV) $(HF4_VENV) .pytest_cache .ruff_cache .hypothesis
