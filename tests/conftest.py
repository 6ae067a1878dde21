"""Shared pytest setup.

`tests/tiny_models.py` and `tests/helpers.py` import as top-level modules (`import tiny_models`,
`import helpers`) from every test directory. The `slow` marker is declared in pyproject.toml;
nothing here registers markers or changes options.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402


@pytest.fixture
def write_model(tmp_path):
    """write_model(proto, name="model.onnx") -> path of `proto` saved under pytest's tmp_path."""
    import onnx

    def _write(proto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save(proto, path)
        return path

    return _write


@pytest.fixture(params=["mlp", "cnn", "attention"])
def tiny(request):
    """(name, ModelProto) for each seeded in-code model."""
    return request.param, getattr(tiny_models, request.param)()
