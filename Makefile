# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is
# missing (CPU set from requirements-cpu.lock) and then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
DEMO_ARGS ?= --model eta --steps 600 --batch-size 128 --eval-every 200 --out runs/demo

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): requirements-cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements-cpu.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m torchrec_longseq.train $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the speed / memory suite (README "Benchmarks"); the quality table is benchmarks/quality.py
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): requirements-bench.lock $(STAMP)
	$(BIN)/pip install -q --no-deps -r requirements-bench.lock
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/throughput.py --lengths 100 1000 10000 100000 --threads 1
	$(BIN)/python benchmarks/retrieval.py --threads 1
	$(BIN)/python benchmarks/fuxictr_anchor.py --threads 1
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) runs
