# Everything installs itself into .venv on first use: a fresh machine needs only
# python3, make and access to the package index.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs servecore, its HTTP ingress and the servecore command (not Ray, not
# the test tools): after make demo, both `servecore` and `python -m servecore` work.
DEMO_STAMP := $(VENV)/.demo-installed
HYPOTHESIS_PROFILE ?= ci

.PHONY: test demo lint typecheck bench bench-ray bench-autoscale bench-scale clean venv

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Everything the tests need, and the example plugin (tests drive it by entry point).
$(STAMP): pyproject.toml examples/mp_runtime/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,ray,http,cli,postgres]'
	$(BIN)/pip install -q -e examples/mp_runtime
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[http,cli]'
	touch $(DEMO_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(BIN)/pytest -q -p no:cacheprovider

demo: $(DEMO_STAMP)
	$(BIN)/python -m examples.demo

# Each benchmark prints a table and writes JSON to benchmarks/results/.
# bench_http loads with wrk (a C load generator) from the distribution's packages, and
# compares with uvicorn (the bench extra).
bench: $(STAMP)
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_router.py
	$(BIN)/python benchmarks/bench_subprocess.py
	$(BIN)/python benchmarks/bench_sync_handle.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_postgres.py

# The control plane at 10 to 10,000 replicas, per store; the plot needs the bench extra.
bench-scale: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_scale.py

# Autoscaling under a load profile beside fixed counts; the plot needs the bench extra.
bench-autoscale: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_autoscale.py

# Beside Ray Serve itself: needs the serve extra, and starts a private local cluster.
bench-ray: $(STAMP)
	$(BIN)/pip install -q -e '.[serve]'
	$(BIN)/python benchmarks/bench_ray.py

clean:
	rm -rf $(VENV) .servecore
