# Two set-up commands: `make serve` and `make test`. Each creates .venv, installs everything,
# prepares the embedded model, then serves / tests. `make bench` runs the benchmark.
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= embedded
# Presets shown as models (server/presets.py); the embedded model ships its own set.
PRESETS ?= $(if $(filter embedded,$(MODEL)),server/data/presets-embedded.yaml,)
VENV := .venv
PY := $(VENV)/bin/python
export ALIGNSERVE_HOME ?= $(HOME)/.cache/alignserve
MODEL_DIR := $(ALIGNSERVE_HOME)/models/SmolLM2-135M-Instruct

.PHONY: install model serve test test-unit test-integration lint typecheck bench clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(VENV)/.installed

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(VENV)/bin/alignserve prepare-model

model: $(MODEL_DIR)/config.json

serve: install model
	$(VENV)/bin/alignserve serve --host $(HOST) --port $(PORT) --model $(MODEL) \
	  $(if $(PRESETS),--presets-file $(PRESETS))

# the unit tier first: a unit failure fails in seconds, before any engine starts
test: install model
	$(PY) -m pytest -q tests/unit
	$(PY) -m pytest -q tests/integration

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy decoding runtime

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install model
	$(PY) -m pytest -q tests/integration

bench: install model
	$(PY) bench/bench_bon.py --out bench/results
	$(PY) bench/bench_spr.py --out bench/results
	$(PY) bench/bench_value_heads.py --out bench/results --limit 240
	VH=$${ALIGNSERVE_HOME:-$$HOME/.cache/alignserve}/value-heads; \
	  $(PY) bench/bench_cd.py --out bench/results --k 4 --m 16 --limit 16 \
	  --values value:fudge value:fudge-adv value:cdq relevance --head fudge=$$VH/head-fudge \
	  --head fudge-adv=$$VH/head-fudge-adv --head cdq=$$VH/head-cdq && \
	  $(PY) bench/bench_tokenwise.py --out bench/results --head $$VH/head-cdq && \
	  $(PY) bench/bench_load.py --out bench/results --with-128 --limit-128 8 \
	  --value value:fudge --value-head fudge=$$VH/head-fudge
	$(PY) bench/bench_dual.py --out bench/results
	$(PY) bench/bench_safedpo.py --out bench/results
	$(PY) bench/bench_bond.py --out bench/results
	$(PY) bench/bench_aligner.py --out bench/results
	$(PY) bench/bench_toolbox.py --out bench/results
	$(PY) bench/bench_block_size.py --out bench/results
	$(PY) bench/bench_scorer_batching.py --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache
