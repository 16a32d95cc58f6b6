# Both entry points create the virtualenv when it is missing; a second run only checks a stamp.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ranray-installed
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS='--n 400 epochs=1' (CI runs the demo shortened this way)
DEMO_ARGS ?=

.PHONY: venv test test-cluster demo bench clean
# The multi-node tests (cluster/local.sh's 3-node cluster: token auth, `ray job submit`, tear-down;
# the demo job on a local 4-node cluster, node and driver kills; a search and a fine-tune logging to
# the authenticated tracking server) run on their own: 9-11 minutes on a 2-core machine
# (.ci/run runs them after `make test` and the demo).
CLUSTER_JOB_TESTS := tests/test_local_cluster.py tests/test_cluster_jobs.py tests/test_cluster_elastic.py \
                     tests/test_prepare_cluster.py tests/test_cluster_tracking.py

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade-strategy only-if-needed -e '.[train,dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) $(addprefix --ignore=,$(CLUSTER_JOB_TESTS)) tests

test-cluster: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) $(CLUSTER_JOB_TESTS)

demo: $(STAMP)
	$(VENV)/bin/ranray demo $(DEMO_ARGS)

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
