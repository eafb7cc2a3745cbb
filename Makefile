# MoR Bench. `make demo` and `make test` bootstrap .venv on first use (torch pinned first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo routers test test-slow test-slurm bench lint format clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Train vanilla, recursive and MoR (tiny, one FLOP budget), evaluate, probe decode, tabulate.
demo: venv
	$(BIN)/mor-run --multirun experiment=demo
	$(BIN)/mor-tables results/runs/demo --out results/demo --tables demo --plots loss_vs_flops
	cp results/demo/tables/demo.md results/demo/table.md
	cp results/demo/tables/demo.csv results/demo/table.csv

# All routers at equal compute on the embedded data: one table and the depth diagnostics plot.
routers: venv
	$(BIN)/mor-run --multirun experiment=routers
	$(BIN)/mor-tables results/runs/routers --out results/routers --tables routers --plots router_depth

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

test-slurm: venv
	bash scripts/local_slurm.sh start
	SLURM_CONF=$$PWD/.slurm/slurm.conf $(BIN)/python -m pytest -q -m slurm

bench: venv
	$(BIN)/python -m harness.benchmarks --out results/bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-demo:
	rm -rf results/runs/demo results/demo
