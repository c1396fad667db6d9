# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is
# missing (CPU set from requirements-cpu.lock) and then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
DEMO_ARGS ?= --model eta --steps 600 --batch-size 128 --eval-every 200 --checkpoint-every 600 --out runs/demo

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): requirements-cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements-cpu.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# OMP_NUM_THREADS=1 is what torchrun sets for 2 ranks anyway; set here, torchrun prints no notice
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m torchrec_longseq.train $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the speed / memory suite as in benchmarks/RESULTS.md (about 18-25 minutes on 2 idle cores); the
# quality runs are benchmarks/quality.py (hours), whose runs/q-L* the report includes if present
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): requirements-bench.lock $(STAMP)
	$(BIN)/pip install -q --no-deps -r requirements-bench.lock
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/throughput.py --lengths 100 1000 10000 100000 --steps 2 --warmup 1 --out runs/throughput
	$(BIN)/python benchmarks/retrieval.py --out runs/retrieval
	$(BIN)/python benchmarks/fuxictr_anchor.py --out runs/anchor-t2
	$(BIN)/python benchmarks/fuxictr_anchor.py --threads 1 --out runs/anchor-t1
	$(BIN)/python benchmarks/fuxictr_anchor.py --long-path-only --out runs/anchor-long
	$(BIN)/python benchmarks/fuxictr_anchor.py --long-path-only --threads 1 --out runs/anchor-long-t1
	$(BIN)/python benchmarks/fuxictr_anchor.py --long-path-only --ours-ranks 2 --out runs/anchor-long-r2
	$(BIN)/python benchmarks/fuxictr_anchor.py --long-path-only --retain-memory --out runs/anchor-long-retain
	$(BIN)/python benchmarks/serving.py --reps 30 --out runs/serving
	$(BIN)/python benchmarks/serving.py --reps 30 --retain-memory --breakdown --out runs/serving-retain
	for L in 1000 100000; do $(BIN)/python benchmarks/serving.py --models avgpool din sim-hard eta twin \
	    --length $$L --reps 30 --retain-memory --breakdown --out runs/serving-retain-L$$L || exit 1; done
	$(BIN)/python benchmarks/report.py --quality $(dir $(wildcard runs/q-L*/quality.json)) --throughput runs/throughput \
	    --retrieval runs/retrieval --anchor runs/anchor-t2 runs/anchor-t1 runs/anchor-long runs/anchor-long-t1 \
	    runs/anchor-long-r2 runs/anchor-long-retain \
	    --serving runs/serving runs/serving-retain runs/serving-retain-L1000 runs/serving-retain-L100000 \
	    --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) runs
