# Two set-up commands: `make serve` and `make test`. Each creates .venv, installs what it needs
# (serve: the server and its engine; test: everything, the offline tools' and test extras too),
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

.PHONY: install install-serve model serve test test-unit test-integration lint typecheck bench soak clean

# .installed-serve: the server and its engine extra; .installed: everything else on top (the
# offline tools' and the test extras), after it so that make -j never runs two installs at once
$(VENV)/.installed-serve: pyproject.toml scripts/install.sh
	EXTRAS= bash scripts/install.sh

$(VENV)/.installed: $(VENV)/.installed-serve
	bash scripts/install.sh

install: $(VENV)/.installed

install-serve: $(VENV)/.installed-serve

$(MODEL_DIR)/config.json: | $(VENV)/.installed-serve
	$(VENV)/bin/alignserve prepare-model

model: $(MODEL_DIR)/config.json

serve: install-serve model
	$(VENV)/bin/alignserve serve --host $(HOST) --port $(PORT) --model $(MODEL) \
	  $(if $(PRESETS),--presets-file $(PRESETS))

# the unit tier first: a unit failure fails in seconds, before any engine starts
test: install model
	$(PY) -m pytest -q tests/unit
	$(PY) -m pytest -q tests/integration

# check_shadowing: no other installed distribution provides our top-level package names
lint: install
	$(VENV)/bin/ruff check .
	$(PY) scripts/check_shadowing.py

typecheck: install
	$(VENV)/bin/mypy decoding runtime server

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
	$(PY) bench/bench_selection.py --out bench/results
	$(PY) bench/bench_concurrency.py --out bench/results
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) bench/bench_peers.py --out bench/results

# Not in CI: 30 minutes of mixed normal and hostile load against a server it starts, then checks
# for leaked slots/leases/engine requests and RSS growth (scripts/soak.py; SOAK_ARGS: e.g.
# --duration 180, or --base-url URL --api-key KEY to target a running server).
soak: install model
	$(PY) scripts/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
