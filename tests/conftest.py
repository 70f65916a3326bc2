"""Shared fixtures (converter-built bundles, found prebuilt via HOSVD_TEST_BUNDLES or built once per session) and
the CI rule that a skip is a failure."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

# Under CI (``CI`` set, as .ci/run runs) a skipped test is reported as an error: a skip there means .ci/run no
# longer installs what the test needs, and the check silently stopped running. The only skips allowed are
# listed here, as a node-id pattern (fnmatch) mapped to the reason it cannot run in CI. None today.
CI_ALLOWED_SKIPS: dict[str, str] = {}


def running_in_ci() -> bool:
    """Whether ``CI`` is set to something other than empty/0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _ci_allows_skip(nodeid: str) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in CI_ALLOWED_SKIPS)


def _skip_to_ci_error(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (report.skipped and running_in_ci()) or hasattr(report, "wasxfail") or _ci_allows_skip(report.nodeid):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason}\n(a skip in CI hides a failure: make .ci/run install what "
                       "this test needs, or add the test to CI_ALLOWED_SKIPS in tests/conftest.py with a reason)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _skip_to_ci_error(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _skip_to_ci_error(outcome.get_result())


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding every bundle of ``tests.build_bundles.BUNDLES`` (``<dir>/<name>/``).

    ``make test`` builds them first and exports HOSVD_TEST_BUNDLES, so the legacy-runtime run (which has no
    TensorFlow) trains the very same bundles; bundles there that an older converter built fail the session.
    Without it they are built here, which needs TensorFlow.
    """
    from tests.build_bundles import build, stale

    prebuilt = os.environ.get("HOSVD_TEST_BUNDLES")
    if prebuilt:
        outdated = stale(prebuilt)
        if outdated:
            pytest.fail(f"HOSVD_TEST_BUNDLES={prebuilt}: {outdated} are missing or were built from other converter "
                        f"sources or options; rebuild them with python -m tests.build_bundles {prebuilt}")
        return Path(prebuilt)

    out = tmp_path_factory.mktemp("bundles")
    build(out)
    return out


@pytest.fixture(scope="session")
def imu_bundle(bundles_dir: Path) -> Path:
    """The hosvd-compressed IMU bundle (Conv1D, 32×3 windows, labels idle/walk/shake, batches 8 and 4)."""
    return bundles_dir / "imu_hosvd"
