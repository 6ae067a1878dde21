"""The import layering of docs/architecture.md is enforced: `lint-imports` (the contracts in
pyproject.toml) passes on the package, every module is in a layer, and a deliberate violation in
a copy of the package makes it fail."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is in the test extra")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(ROOT / "qcompile", dst / "qcompile", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


def test_every_module_is_in_a_layer():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {m.strip() for layer in cfg["layers"] for m in layer.split(":")}
    top = {f"qcompile.{p.stem if p.is_file() else p.name}" for p in (ROOT / "qcompile").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert top <= layered, f"modules in no layer: {sorted(top - layered)}"


@pytest.mark.parametrize("module, bad_import", [
    ("qcompile/formats.py", "import qcompile.pipeline"),               # core reaching up to the pipeline
    ("qcompile/passes/normalize.py", "import qcompile.backends.onnxruntime.session"),  # a pass importing a backend
    ("qcompile/passes/fold_batchnorm.py", "import onnxruntime"),       # ... or onnxruntime itself
    ("qcompile/stages.py", "import qcompile.zoo"),                     # the library importing a tool
])
def test_a_violation_fails(tmp_path, module, bad_import):
    repo = _copy(tmp_path)
    path = repo / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + bad_import + "  # deliberate layering violation\n" + rest)
    r = _lint(repo)
    assert r.returncode != 0, f"{bad_import} in {module} was not caught"
    assert "BROKEN" in r.stdout
