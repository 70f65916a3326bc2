"""The CI rule of tests/conftest.py, on a generated test file run by pytest in a child: under CI=true every skip
(a skip marker, ``pytest.skip`` in a test, a skipped module) is an error naming the test, unless the test is
listed in CI_ALLOWED_SKIPS; without CI the same file just skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TESTS = """\
import shutil

import pytest


@pytest.mark.skipif(shutil.which("frobtool") is None, reason="frobtool not installed")
def test_needs_frobtool():
    pass


def test_skips_inside():
    pytest.skip("no frob device here")


def test_allowed_hardware_only():
    pytest.skip("needs real I2C hardware")


@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    raise AssertionError


def test_plain():
    pass
"""

SKIPPED_MODULE = 'import pytest\n\npytest.importorskip("frobnicate_not_a_module")\n'

ALLOW = """\
import tests.conftest as shared

shared.CI_ALLOWED_SKIPS["*::test_allowed_hardware_only"] = "the emulated tier has no I2C bus"
"""


def run_pytest(directory: Path, ci: str | None, *files: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-rA", "-q", *files], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_under_ci_a_skip_fails_naming_the_test(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(ALLOW)
    (tmp_path / "test_tools.py").write_text(TESTS)
    (tmp_path / "test_optional_module.py").write_text(SKIPPED_MODULE)

    local = run_pytest(tmp_path, None, "test_tools.py", "test_optional_module.py")
    assert local.returncode == 0, local.stdout
    assert "1 passed, 4 skipped, 1 xfailed" in local.stdout, local.stdout
    assert run_pytest(tmp_path, "false", "test_tools.py", "test_optional_module.py").returncode == 0

    ci = run_pytest(tmp_path, "true", "test_tools.py")
    out = ci.stdout
    assert ci.returncode == 1, out
    assert "ERROR test_tools.py::test_needs_frobtool - skipped under CI=true: frobtool not installed" in out, out
    assert "FAILED test_tools.py::test_skips_inside - skipped under CI=true: no frob device here" in out, out
    assert "SKIPPED [1] test_tools.py" in out and "needs real I2C hardware" in out  # listed, so allowed
    assert "XFAIL test_tools.py::test_known_failure" in out  # an expected failure is not a skip
    assert "PASSED test_tools.py::test_plain" in out
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out, out

    module = run_pytest(tmp_path, "true", "test_optional_module.py")
    assert module.returncode != 0, module.stdout
    assert "ERROR test_optional_module.py - skipped under CI=true" in module.stdout, module.stdout
    assert "frobnicate_not_a_module" in module.stdout
