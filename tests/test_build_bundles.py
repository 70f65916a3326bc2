"""The test-bundle cache: a stamp goes stale when the converter's or the contract's sources change."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests import build_bundles
from tests.build_bundles import REPO, SOURCES, STAMP, build_spec, stale


def test_a_converter_edit_makes_every_cached_bundle_stale(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    for entry in SOURCES:
        src = REPO / entry
        if src.is_file():
            (root / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / entry)
        else:
            shutil.copytree(src, root / entry, ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "bundles"
    for name in build_bundles.BUNDLES:
        (cache / name).mkdir(parents=True)
        (cache / name / STAMP).write_text(build_spec(name, root))
    assert stale(cache, root) == []

    (root / "converter" / "__pycache__").mkdir(exist_ok=True)
    (root / "converter" / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # not a source
    assert stale(cache, root) == []

    contract = root / "hosvd_contract" / "manifest.py"
    contract.write_text(contract.read_text() + "\n# a change\n")
    assert stale(cache, root) == list(build_bundles.BUNDLES)
    contract.write_text(contract.read_text().removesuffix("\n# a change\n"))
    assert stale(cache, root) == []

    layer = next((root / "converter").rglob("*.py"))
    layer.write_bytes(layer.read_bytes().replace(b"\n", b"\n\n", 1))
    assert stale(cache, root) == list(build_bundles.BUNDLES)
    (cache / "imu_none" / STAMP).unlink()
    assert "imu_none" in stale(cache, root)
