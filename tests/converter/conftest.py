"""Converter tests need TensorFlow; they are left out of the legacy-runtime run."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/converter/" in str(item.fspath):
            item.add_marker(pytest.mark.needs_tf)
