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

clean:
	rm -rf $(VENV) runs
