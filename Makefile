# One entry point for a fresh machine: `make demo` runs the end-to-end demo, `make test` the test suite.
# Both create the virtual environment at .venv (Python 3.11: tflite-runtime 2.14 exists only for 3.11).
PYTHON ?= python3.11
VENV := .venv
LEGACY := .venv-legacy
PY := $(VENV)/bin/python
BUNDLES := .test-bundles

.PHONY: venv legacy-venv test test-main test-legacy lint demo bench-quick bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[converter,device,camera,demo,dev]'
	touch $@

# The device side on the legacy runtime: tflite-runtime 2.14 + numpy<2, and no TensorFlow at all.
$(LEGACY)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install --quiet --upgrade pip
	$(LEGACY)/bin/pip install --quiet -e '.[device-legacy,camera,dev]'
	touch $@

venv: $(VENV)/.installed
legacy-venv: $(LEGACY)/.installed

lint: venv
	$(VENV)/bin/ruff check .

# Main suite (TensorFlow, ai-edge-litert), then the device tests again on tflite-runtime 2.14 with bundles
# the first run built. pytest exits 5 when it collected nothing: that fails the target.
test: venv legacy-venv lint
	$(PY) -m tests.build_bundles $(BUNDLES)
	HOSVD_TEST_BUNDLES=$(abspath $(BUNDLES)) $(PY) -m pytest -q
	HOSVD_TEST_BUNDLES=$(abspath $(BUNDLES)) HOSVD_EXPECT_RUNTIME=tflite-runtime \
		$(LEGACY)/bin/python -m pytest -q -m "not needs_tf" tests/device tests/runtime

demo: venv
	$(PY) -m demo

bench-quick: venv
	$(PY) -m bench --quick

# The full suite (see docs/bench.md for its run time).
bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LEGACY) $(BUNDLES)
