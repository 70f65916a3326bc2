"""Shared fixtures: converter-built bundles, found prebuilt (HOSVD_TEST_BUNDLES) or built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding every bundle of ``tests.build_bundles.BUNDLES`` (``<dir>/<name>/``).

    ``make test`` builds them first and exports HOSVD_TEST_BUNDLES, so the legacy-runtime run (which has no
    TensorFlow) trains the very same bundles. Without it they are built here, which needs TensorFlow.
    """
    prebuilt = os.environ.get("HOSVD_TEST_BUNDLES")
    if prebuilt:
        return Path(prebuilt)
    from tests.build_bundles import build

    out = tmp_path_factory.mktemp("bundles")
    build(out)
    return out


@pytest.fixture(scope="session")
def imu_bundle(bundles_dir: Path) -> Path:
    """The hosvd-compressed IMU bundle (Conv1D, 32×3 windows, labels idle/walk/shake, batches 8 and 4)."""
    return bundles_dir / "imu_hosvd"
