# `make test`: the one command that sets everything up and runs the whole suite
# on both backends. It creates .venv/, installs the package with its test extra
# at the tested versions (constraints/tested.txt), then runs pytest once with
# KERAS_BACKEND=tensorflow and once with KERAS_BACKEND=jax. It fails if either
# run fails.
#
# `make demo`: the same environment, then the one-command demo
# (`python -m keras_callbacks_plus demo --out runs/demo`) on DEMO_BACKEND
# (KERAS_BACKEND if set, else tensorflow).

PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= tensorflow jax
PYTEST_ARGS ?=
DEMO_BACKEND ?= $(or $(KERAS_BACKEND),tensorflow)
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

$(STAMP): setup.cfg pyproject.toml constraints/tested.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints/tested.txt -e ".[test]"
	touch $@

venv: $(STAMP)

test: $(STAMP)
	@failed=""; \
	for backend in $(BACKENDS); do \
		echo "== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend $(VENV)/bin/python -m pytest $(PYTEST_ARGS) || failed="$$failed $$backend"; \
	done; \
	if [ -n "$$failed" ]; then echo "== FAILED on:$$failed"; exit 1; fi

demo: $(STAMP)
	KERAS_BACKEND=$(DEMO_BACKEND) TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m keras_callbacks_plus demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
