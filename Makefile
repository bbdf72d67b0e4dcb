# Every target creates or reuses its virtual environment and installs what it
# needs: nothing is expected to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOAD_STAMP := $(VENV)/.installed-load
BENCH_STAMP := $(VENV)/.installed-bench
# PYTEST_ARGS="-x tests/test_ring.py" narrows `make test` and `make suite`.
PYTEST_ARGS ?=

.PHONY: demo test suite sanitize chaos bench bench-amqp broker-installed loadtest lint format clean

# The compiled fast path is built by the install: a change to its sources installs again.
EXT_SOURCES := setup.py src/mpevent/processes/_fastpath.c

$(STAMP): pyproject.toml $(EXT_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# pip shows a build's own output only with -v: say here which path it gave.
	@$(BIN)/python -c 'from mpevent.processes import fastpath; print("mpevent:", fastpath.describe())'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mpevent.tools.demo

# `make test`: ruff once, then the suite on every supported CPython this
# machine has: $(PYTHON) in .venv, each other supported X.Y in .venv-X.Y
# (created and installed by `make suite` like .venv). The supported versions
# are the classifiers in pyproject.toml; interpreters are looked for on PATH,
# then under pyenv, newest patch release first. One that does not run (a
# pyenv shim for a version that is not selected), is not CPython, is a
# free-threaded build or cannot create a venv is passed over. Every suite
# runs even when one fails; the exit status says whether all passed.
# Passes: the compiled fast path on every interpreter, the pure-Python path
# (MPEVENT_NO_EXTENSIONS=1) and the broker tests on the default one only, to
# keep the run near 20 minutes here; OTHER_PASSES="compiled pure" runs the
# pure path everywhere too.
OTHER_PASSES ?= compiled
SUPPORTED = $(shell sed -n 's/^ *"Programming Language :: Python :: \(3\.[0-9][0-9]*\)",*$$/\1/p' pyproject.toml)
PROBE = import sys, sysconfig, venv, ensurepip; \
  sys.exit(sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED") \
           or "%d.%d" % sys.version_info[:2] != sys.argv[1])
# X.Y=interpreter for each supported version but the default venv's one.
define OTHER_PYTHONS
default=$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
for v in $(SUPPORTED); do \
  [ "$$v" = "$$default" ] && continue; found=; \
  for p in $$(IFS=:; for d in $$PATH; do echo "$$d/python$$v"; done) \
           $$(ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/*/bin/python$$v 2>/dev/null | sort -rV); do \
    if [ -x "$$p" ] && "$$p" -c '$(PROBE)' "$$v" >/dev/null 2>&1; then echo "$$v=$$p"; found=1; break; fi; \
  done; \
  [ -n "$$found" ] || echo "make test: no working CPython $$v found (PATH, pyenv): not tested on it" >&2; \
done
endef

test: lint $(STAMP) broker-installed
	@status=0; failed=; \
	for vp in default $$($(OTHER_PYTHONS)); do \
	  if [ "$$vp" = default ]; then args=; passes='$(PASSES)'; label="$$($(BIN)/python -V) in $(VENV)"; \
	  else args="VENV=.venv-$${vp%%=*} PYTHON=$${vp#*=}"; passes='$(OTHER_PASSES)'; \
	    label="$${vp#*=} in .venv-$${vp%%=*}"; fi; \
	  echo "== make test: $$label"; \
	  $(MAKE) --no-print-directory suite $$args PASSES="$$passes" PYTEST_ARGS='$(PYTEST_ARGS)' \
	    || { status=1; failed="$$failed $$label;"; }; \
	done; \
	if [ $$status -ne 0 ]; then echo "make test: the suite failed on$$failed" >&2; fi; \
	exit $$status

# The suite on one interpreter: .venv, or VENV=.venv-X.Y PYTHON=/path/to/pythonX.Y,
# once per pass: "compiled" (the fast path, when it was built: each pass says
# which path runs), "pure" (MPEVENT_NO_EXTENSIONS=1) and "broker" (the tests
# marked broker: the relay, the private broker, the chaos suite's broker
# faults, on the compiled path). The first two leave the broker tests out
# (MPEVENT_BROKER=off): the broker and the relay are the same whatever the
# interpreter or the producer's path, so `make test` runs them once, in
# .venv, and every pass stays under five minutes here. PASSES="pure" for one.
PASSES ?= compiled pure broker
suite: $(STAMP) broker-installed
	@status=0; for pass in $(PASSES); do \
	  case $$pass in compiled) off=; broker=off; only=;; pure) off=1; broker=off; only=;; \
	    broker) off=; broker=; only="-m broker";; \
	    *) echo "make suite: unknown pass $$pass (compiled, pure, broker)" >&2; exit 2;; esac; \
	  path=$$(MPEVENT_NO_EXTENSIONS=$$off $(BIN)/python -c \
	    'from mpevent.processes import fastpath; print(fastpath.describe())'); \
	  echo "== $$pass pass ($$path$${broker:+; the broker tests are the broker pass's})"; \
	  MPEVENT_BROKER=$$broker MPEVENT_NO_EXTENSIONS=$$off $(BIN)/python -m pytest -q $$only \
	    $(PYTEST_ARGS) || status=1; \
	done; exit $$status

# `make sanitize`: the extension built with ASan and UBSan into build/sanitize
# (a copy of the tree, installed there with --target, never into a venv),
# then the ring, bus, fast-path and chaos tests against it, in processes
# that preload the ASan runtime (CPython itself is not instrumented; its
# allocations are, with PYTHONMALLOC=malloc; CPython's leaks at exit are not
# reported, and the quarantine of freed memory is bounded so that the chaos
# suite's flat-RSS check measures mpevent, not ASan). `python -P`: the checkout in the
# working directory must not shadow the copy; --capture=sys: a report reaches the
# terminal even when it aborts the run. The build is removed after.
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS ?= tests/test_ring.py tests/test_bus_*.py tests/test_fastpath*.py tests/chaos
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SANITIZE_ENV = PYTHONPATH=$(abspath $(SANITIZE_DIR))/site PYTHONMALLOC=malloc \
  LD_PRELOAD=$$($${CC:-gcc} -print-file-name=libasan.so) \
  ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=8 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: $(STAMP)
	rm -rf $(SANITIZE_DIR)
	$(BIN)/python -c 'import shutil; shutil.copytree(".", "$(SANITIZE_DIR)/src", ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.so"))'
	CFLAGS="$(SANITIZE_FLAGS) -g -O1" LDFLAGS="$(SANITIZE_FLAGS)" $(BIN)/python -m pip install \
	  --quiet --no-deps --no-index --no-build-isolation --target $(SANITIZE_DIR)/site $(SANITIZE_DIR)/src
	@status=0; $(SANITIZE_ENV) $(BIN)/python -P -c 'import mpevent.processes.fastpath as f; \
	  assert f.COMPILED and "$(SANITIZE_DIR)/site/" in f.extension.__file__, f.REASON; \
	  print("== sanitize:", f.extension.__file__)' \
	  && $(SANITIZE_ENV) $(BIN)/python -P -m pytest -q --capture=sys -p no:cacheprovider $(SANITIZE_TESTS) || status=1; \
	rm -rf $(SANITIZE_DIR); exit $$status

# The chaos suite at length: many rounds of SIGKILL under load, with figures.
chaos: $(STAMP) broker-installed
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

# The RabbitMQ client comparison (README, "RabbitMQ client"): each client's raw
# publish loop with confirms against a private broker; AMQP_BENCH_ARGS="--messages 5000".
AMQP_BENCH_STAMP := $(VENV)/.installed-amqp-bench
$(AMQP_BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,amqp-bench]'
	touch $(AMQP_BENCH_STAMP)

bench-amqp: $(AMQP_BENCH_STAMP) broker-installed
	$(BIN)/python -m mpevent.tools.bench.amqp_clients $(AMQP_BENCH_ARGS)

# The broker tests run Debian's rabbitmq-server as a private node
# (mpevent/tools/broker.py): installed here when missing, as root, with apt-get
# (about 15 s); a no-op when it is there. The package would start a system
# broker on 5672 (and epmd on 4369): a policy-rc.d that exits 101, ours only if
# there was none, stops that, and whatever listens there after the install
# that did not before is stopped. Not root: say how to install it and go on
# (the broker tests skip, and fail in CI). BROKER_DRY_RUN=1 goes through the
# steps as if it were missing, printing the commands that change the system.
BROKER_SERVER := /usr/lib/rabbitmq/bin/rabbitmq-server
BROKER_DRY_RUN ?=
BROKER_POLICY ?= /usr/sbin/policy-rc.d
LISTENING = $(PYTHON) -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)'
broker-installed:
	@if [ -z "$(BROKER_DRY_RUN)" ] && [ -x $(BROKER_SERVER) ]; then exit 0; fi; \
	run=; [ -n "$(BROKER_DRY_RUN)" ] && run="echo would run:"; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make: rabbitmq-server is not installed: the broker tests will skip (in CI they fail);" \
	    "install it as root with: apt-get update && apt-get install -y rabbitmq-server" >&2; exit 0; fi; \
	echo "make: installing rabbitmq-server (apt-get, about 15 s)"; \
	before=; for port in 5672 4369; do $(LISTENING) $$port && before="$$before $$port"; done; \
	policy=$(BROKER_POLICY); ours=; \
	if [ ! -e $$policy ]; then ours=1; \
	  $$run sh -c "printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy"; fi; \
	status=0; \
	{ $$run apt-get update -qq && \
	  $$run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server; } || status=$$?; \
	if $(LISTENING) 5672 && ! echo "$$before" | grep -qw 5672; then \
	  echo "make: stopping the system broker the package started"; \
	  $$run service rabbitmq-server stop || status=1; fi; \
	if $(LISTENING) 4369 && ! echo "$$before" | grep -qw 4369; then \
	  echo "make: stopping the epmd the package started"; $$run epmd -kill || status=1; fi; \
	[ -z "$$ours" ] || $$run rm -f $$policy; \
	if [ $$status -ne 0 ]; then \
	  echo "make: installing rabbitmq-server failed: the broker tests will skip (in CI they fail)" >&2; \
	  if [ -n "$$CI" ]; then exit $$status; fi; fi

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
	rm -rf $(VENV) .venv-* build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find mpevent -name '*.so' -delete
