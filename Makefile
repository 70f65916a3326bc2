# One entry point for a fresh machine: `make demo` runs the end-to-end demo, `make test` the test suite.
# Both create the virtual environment at .venv (Python 3.11: tflite-runtime 2.14 exists only for 3.11).
PYTHON ?= python3.11
VENV := .venv
LEGACY := .venv-legacy
PY := $(VENV)/bin/python
BUNDLES := .test-bundles

.PHONY: venv legacy-venv test test-main test-legacy test-arm64 lint demo bench-quick bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[converter,device,camera,demo,fleet,dev]'
	# amqtt 0.11 (demo) pins typer==0.15.4 for its own command-line scripts, which the demo never runs; flwr's CLI
	# (fleet) needs typer >= 0.19 (Literal options) although flwr's metadata allows 0.13, so pip picks 0.15.4.
	$(VENV)/bin/pip install --quiet 'typer>=0.19,<0.21'
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
# Two pytest-xdist workers, each taking whole test files (--dist loadfile: a file's module fixtures are built
# once): many tests wait on brokers, daemons and child processes, so two workers fit two cores.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile
test: venv legacy-venv lint
	$(PY) -m tests.build_bundles $(BUNDLES)
	HOSVD_TEST_BUNDLES=$(abspath $(BUNDLES)) $(PY) -m pytest -q $(PYTEST_PARALLEL)
	HOSVD_TEST_BUNDLES=$(abspath $(BUNDLES)) HOSVD_EXPECT_RUNTIME=tflite-runtime \
		$(LEGACY)/bin/python -m pytest -q $(PYTEST_PARALLEL) -m "not needs_tf" tests/device tests/runtime

# The device side on emulated aarch64 (needs root): a Debian 12 arm64 root filesystem under qemu-user emulating a
# Pi 4's Cortex-A72, cached under $(ARM64_CACHE) and rebuilt only when its inputs change (tools/arm64/rootfs.sh).
# The device and runtime tests run there on both runtimes against the bundles the x86 converter built, as in the
# legacy run above; then the x86/aarch64 parity check runs on the host.
ARM64 := tools/arm64/rootfs.sh
ARM64_FIXTURES := .cache/arm64-fixtures
export ARM64_CACHE ?= $(abspath .cache/arm64)
ARM64_ENV := HOSVD_TEST_BUNDLES=$(abspath $(BUNDLES)) HOSVD_ARM64_FIXTURES=$(abspath $(ARM64_FIXTURES))
# Not run under emulation: RSS there includes qemu's own memory (its translation cache), so the plan's measured
# peaks (from x86) cannot bound it; memory on aarch64 needs a real Pi (README, "What was tested where").
ARM64_DESELECT := --deselect tests/device/test_store_scale.py::test_peak_rss_does_not_depend_on_how_many_windows_are_stored

test-arm64: venv legacy-venv
	$(PY) -m tests.build_bundles $(BUNDLES)
	$(PY) -m tests.arm64.fixtures $(ARM64_FIXTURES)
	$(ARM64) ensure
	$(ARM64_ENV) HOSVD_EXPECT_RUNTIME=ai-edge-litert \
		$(ARM64) run device python -m pytest -q -m "not needs_tf" $(ARM64_DESELECT) tests/device tests/runtime tests/arm64
	$(ARM64_ENV) HOSVD_EXPECT_RUNTIME=tflite-runtime \
		$(ARM64) run legacy python -m pytest -q -m "not needs_tf" $(ARM64_DESELECT) tests/device tests/runtime tests/arm64
	$(ARM64_ENV) $(PY) -m pytest -q -rP tests/arm64

demo: venv
	$(PY) -m demo

bench-quick: venv
	$(PY) -m bench --quick

# The full suite (see docs/bench.md for its run time).
bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LEGACY) $(BUNDLES) $(ARM64_FIXTURES)
