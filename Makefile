# Quick start: `make demo` runs the closed loop once; `make test` runs the test suite.
# Both create .venv (Python 3.11) and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: demo test test-unit test-system system-deps lint docs benchmark install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned torch first: these wheels are on local disk here; an unpinned torch downloads GBs
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'  # test pulls in every optional part (edgeloop[all])
	touch $@

install: $(VENV)/.installed

# e.g. make demo DEMO_ARGS="--scans 6" (continual learning under the retraining policy)
demo: $(VENV)/.installed
	$(VENV)/bin/edgeloop demo --out $(OUT) $(DEMO_ARGS)

# the layers' import contracts, ruff and the strict docs build first: a violation fails
# the test command
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --config setup.cfg --no-cache
	$(MAKE) docs

# the documentation site into build/site; its reference pages are generated from the code
docs: $(VENV)/.installed
	DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict --quiet

# one pytest process by default; TEST_WORKERS=N spreads the modules over N pytest-xdist
# workers, each with CA ports of its own (tests/kit/env.py; docs/howto/tests.md says what
# two workers measured on 2 cores)
TEST_WORKERS ?= 1
xdist = $(if $(filter-out 1,$(1)),-n $(1) --dist loadfile)
XDIST := $(call xdist,$(TEST_WORKERS))

# a stock MLflow tracking server for the tests of records.mlflow_uri, in an environment of
# its own as a facility runs one: its graphene pins graphql-core below what Tiled's server
# needs, so it cannot live beside edgeloop (edgeloop[mlflow] is the client, mlflow-skinny)
MLFLOW_VENV ?= .venv-mlflow
$(MLFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q 'mlflow==3.17.2'
	touch $@

test: lint system-deps
	$(PY) -m pytest $(XDIST)

# the unit tier alone on two workers unless told otherwise: it starts no loops of processes
# whose deadlines a starved CPU could break (on 2 cores: 1:22 against 2:12 for one)
UNIT_WORKERS ?= 2
test-unit: $(VENV)/.installed
	$(PY) -m pytest $(call xdist,$(UNIT_WORKERS)) tests/unit

test-system: $(VENV)/.installed system-deps
	$(PY) -m pytest $(XDIST) tests/system

# the Debian libraries the real simDetector IOC of ../shared/adsim links to (its README),
# installed only when one is missing
ADSIM ?= ../shared/adsim
ADSIM_LIBS = libhdf5-103-1 libblosc1 libsz2 libtiff6 libxml2 libjpeg62-turbo libreadline8
system-deps: $(MLFLOW_VENV)/.installed
	@if ldd $(ADSIM)/bin/simDetectorApp | grep -q "not found"; then \
		apt-get install -y -q $(ADSIM_LIBS) || \
		{ apt-get update -q && apt-get install -y -q $(ADSIM_LIBS); }; fi
	@# the Queue Server's store (the tests start their own, on loopback)
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server || \
		{ apt-get update -q && apt-get install -y -q redis-server; }

benchmark: $(VENV)/.installed
	$(VENV)/bin/edgeloop bench --out out/bench
	$(PY) benchmarks/edge_throughput.py
	$(PY) benchmarks/monitor_load.py

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) out
