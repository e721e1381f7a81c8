# featurezoo: `make demo` and `make test` do all set-up on a fresh machine.
PY        ?= python3
VENV      ?= .venv
FZ_CACHE  ?= $(HOME)/.cache/featurezoo
# The MindCV reference environment and its outputs live outside the repo, keyed by version.
MS_VENV   ?= $(FZ_CACHE)/venv-mindcv-0.3.0-ms-2.10.0
REF_CACHE ?= $(FZ_CACHE)/mindcv-ref
PYTEST_ARGS ?= -n 2 --dist loadgroup -q

export FEATUREZOO_REF_CACHE := $(REF_CACHE)

.PHONY: venv msvenv refs test demo bench clean

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The MindCV venv lives outside the repo, so a fresh clone's new file times must not rebuild it: it is rebuilt
# when the requirements differ from the copy kept in it, which is written last, after a complete install.
msvenv:
	@if cmp -s tools/mindcv-requirements.txt $(MS_VENV)/requirements.txt; then \
		echo "MindCV environment up to date: $(MS_VENV)"; \
	else \
		set -ex; rm -rf $(MS_VENV); $(PY) -m venv $(MS_VENV); \
		$(MS_VENV)/bin/pip install -q --disable-pip-version-check -r tools/mindcv-requirements.txt; \
		cp tools/mindcv-requirements.txt $(MS_VENV)/requirements.txt; \
	fi

# MindCV reference outputs for every model the tests compare (only missing ones are computed).
refs: venv msvenv
	mkdir -p $(REF_CACHE)
	$(VENV)/bin/python -m tests.zoo jobs > $(REF_CACHE)/jobs.json
	# Two shards in parallel: building MindCV models is mostly single-threaded Python.
	$(MS_VENV)/bin/python tools/mindcv_reference.py --out $(REF_CACHE) --jobs $(REF_CACHE)/jobs.json --shard 0/2 & \
	pid=$$!; \
	$(MS_VENV)/bin/python tools/mindcv_reference.py --out $(REF_CACHE) --jobs $(REF_CACHE)/jobs.json --shard 1/2; \
	rc=$$?; wait $$pid && exit $$rc

test: venv refs
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/featurezoo demo

bench: venv
	$(VENV)/bin/python benchmarks/bench_features.py

clean:
	rm -rf $(VENV) build *.egg-info
