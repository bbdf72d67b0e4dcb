# Every target creates or reuses .venv and installs what it needs: nothing is
# expected to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOAD_STAMP := $(VENV)/.installed-load
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test chaos bench loadtest lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mpevent.tools.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The chaos suite at length: many rounds of SIGKILL under load, with figures.
chaos: $(STAMP)
	MPEVENT_CHAOS_ROUNDS=$${MPEVENT_CHAOS_ROUNDS:-200} MPEVENT_OVERLOAD_SECONDS=$${MPEVENT_OVERLOAD_SECONDS:-60} \
	  $(BIN)/python -m pytest -q -s -m chaos tests/chaos

# The benchmark, side by side; BENCH_ARGS="--quick" or "--json out.json --plot out.png".
bench: $(BENCH_STAMP)
	$(BIN)/python -m mpevent.tools.bench $(BENCH_ARGS)

# Optional extras have stamps of their own: `make test` needs neither
# locust nor the benchmark's comparison pipelines.
$(LOAD_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,load]'
	touch $(LOAD_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Headless locust runs (SIP-like requests, then raise_event from forked
# locust processes) against a private hub; LOADTEST_ARGS="--sip-time 5 ...".
loadtest: $(LOAD_STAMP)
	$(BIN)/python loadtest/run.py $(LOADTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
