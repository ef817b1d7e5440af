# Set-up and everyday commands. Every target works on a fresh machine (it creates .venv).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= torch==2.14.1

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first: the extension builds against the installed torch (--no-build-isolation).
install: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)" numpy pytest ninja "setuptools>=64" wheel
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"

# SFICONV_REQUIRE_EXTENSION: fail (not skip the kernel tests) if the built binary does not load.
test: install
	SFICONV_REQUIRE_EXTENSION=1 $(BIN)/python -m pytest python_tests -q

# The main job: train on the built-in dataset (offline, a few minutes on a 2-core CPU).
demo: install
	$(BIN)/sficonv train --data builtin --out runs/demo --overwrite

# On the CPU even where a GPU is present; into runs/, so the committed results stay as measured.
bench: install
	$(BIN)/python benchmarks/bench_models.py --device cpu --variants reference fast plain fused-inference \
	    --json runs/bench/models_cpu.json

clean:
	rm -rf build *.egg-info sficonv_ext/_C*.so
