"""Shared pytest setup.

`tests/tiny_models.py` and `tests/helpers.py` import as top-level modules (`import tiny_models`,
`import helpers`) from every test directory (tests/passes, tests/backends, ...). The `slow` marker
is declared in pyproject.toml; nothing here registers markers or changes options.
"""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
