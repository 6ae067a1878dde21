"""Shared pytest setup.

`tests/tiny_models.py` and `tests/helpers.py` import as top-level modules (`import tiny_models`,
`import helpers`) from every test directory (tests/passes, tests/backends, ...). The `slow` marker
is declared in pyproject.toml; nothing here registers markers or changes options. `native_lib`:
the optional native library for the tests that run its ops.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def native_lib():
    """The optional native library (`qcompile.native`), built once; when it cannot be built the
    test fails under CI (env CI set) and is skipped elsewhere."""
    from qcompile import native

    try:
        return native.build()
    except native.NativeUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"native library unavailable under CI: {e}")
        pytest.skip(f"native library unavailable: {e}")
