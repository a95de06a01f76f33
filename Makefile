# `make test`: the one command that sets everything up and runs the whole suite
# on both backends. It creates .venv/, installs the package with its test extra
# at the tested versions (constraints/tested.txt), then runs pytest once with
# KERAS_BACKEND=tensorflow and once with KERAS_BACKEND=jax, side by side (SERIAL=1:
# one after the other, output as it comes). It fails if either run fails. CI
# (.ci/run) runs exactly this.
#
# `make test-fast`: the same environment and both backends, without the tests
# marked `slow` (a fresh Python process: the demo, the benchmarks' quick runs,
# the SIGKILL loop; or a long run) or `multiprocess` (two-worker jobs), that is
# pytest -m "not slow and not multiprocess". For the edit-test loop (under
# 3 minutes on 2 cores); `make test` still runs everything.
#
# `make demo`: the same environment, then the one-command demo
# (`python -m keras_callbacks_plus demo --out runs/demo`) on DEMO_BACKEND
# (KERAS_BACKEND if set, else tensorflow).

PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= tensorflow jax
PYTEST_ARGS ?=
FAST_MARKERS := not slow and not multiprocess
DEMO_BACKEND ?= $(or $(KERAS_BACKEND),tensorflow)
DEMO_OUT ?= runs/demo
LOGS ?= .test-logs
SERIAL ?=
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo venv clean

$(STAMP): setup.cfg pyproject.toml constraints/tested.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints/tested.txt -e ".[test]"
	touch $@

venv: $(STAMP)

# $(call pytest_each_backend,ARGS): pytest ARGS $(PYTEST_ARGS) once per backend; fails if any failed.
# The backends run side by side (most tests keep one core busy, so two runs share two cores
# well); each run's output is printed when both are done. SERIAL=1 runs them one after the other.
define pytest_each_backend
	@mkdir -p $(LOGS); rm -f $(LOGS)/*.rc $(LOGS)/*.log; failed=""; \
	if [ -n "$(SERIAL)" ]; then \
		for backend in $(BACKENDS); do \
			echo "== KERAS_BACKEND=$$backend"; \
			KERAS_BACKEND=$$backend $(VENV)/bin/python -m pytest $(1) $(PYTEST_ARGS) || failed="$$failed $$backend"; \
		done; \
	else \
		for backend in $(BACKENDS); do \
			echo "== KERAS_BACKEND=$$backend: started, output in $(LOGS)/$$backend.log"; \
			( KERAS_BACKEND=$$backend $(VENV)/bin/python -m pytest $(1) $(PYTEST_ARGS) \
				> $(LOGS)/$$backend.log 2>&1; echo $$? > $(LOGS)/$$backend.rc ) & \
		done; \
		wait; \
		for backend in $(BACKENDS); do \
			echo "== KERAS_BACKEND=$$backend"; cat $(LOGS)/$$backend.log; \
			[ "$$(cat $(LOGS)/$$backend.rc 2>/dev/null)" = 0 ] || failed="$$failed $$backend"; \
		done; \
	fi; \
	if [ -n "$$failed" ]; then echo "== FAILED on:$$failed"; exit 1; fi
endef

test: $(STAMP)
	$(call pytest_each_backend,)

test-fast: $(STAMP)
	$(call pytest_each_backend,-m "$(FAST_MARKERS)")

demo: $(STAMP)
	KERAS_BACKEND=$(DEMO_BACKEND) TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m keras_callbacks_plus demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(LOGS)
