"""Real EfficientNet-Lite0 export (qcompile.zoo.efficientnet), the offline images (qcompile.zoo.images)
and the zoo's data hook (qcompile.zoo.get_data)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from qcompile import zoo

slow = pytest.mark.slow

MODEL = "efficientnet-lite0"
# ImageNet-1k class indices named in the output (the model ships no label file).
LABELS = {442: "bell cote", 449: "boathouse", 483: "castle", 663: "monastery", 698: "palace",
          975: "lakeside", 985: "daisy"}


def _name(idx: int) -> str:
    return f"{idx} {LABELS.get(idx, '')}".strip()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The EfficientNet-Lite0 ONNX file, exported and verified once into a private cache dir."""
    return zoo.get_model(MODEL, cache_dir=tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="module")
def session(model):
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_get_data_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(KeyError, match=r"efficientnet-lite0.*minilm"):
        zoo.get_data("no-such-model", "calib", 4, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert MODEL in zoo.MODELS and set(zoo.DATA) >= {"minilm", MODEL}


@slow
def test_export_matches_framework_and_is_cached(model):
    import onnx

    info = json.loads((model.parent / f"{MODEL}.json").read_text())
    print(f"\n{MODEL}: export {info['export_seconds']} s, {info['file_bytes'] / 1e6:.1f} MB, "
          f"max abs diff {info['max_abs_diff']:.2e} (batches {info['verify_batches']}), ops {info['op_types']}")
    assert info["max_abs_diff"] <= 1e-4 and info["verify_batches"] == [1, 4]
    assert model.name == f"{MODEL}.onnx" and model.stat().st_size == info["file_bytes"] > 15e6
    assert not [p for p in model.parent.iterdir() if p.name.endswith(".tmp")]

    proto = onnx.load(str(model))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 13
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 26
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Conv"] == ops["BatchNormalization"] == 49  # BN left for qcompile to fold
    assert 4.5e6 < sum(np.prod(t.dims) for t in proto.graph.initializer) < 4.8e6  # 4.65M parameters

    mtime = model.stat().st_mtime_ns
    assert zoo.get_model(MODEL, cache_dir=model.parent) == model
    assert model.stat().st_mtime_ns == mtime  # served from the cache, not rebuilt


@slow
def test_batch_1_and_4_match_pytorch_on_calib_images(session):
    import torch

    from qcompile.zoo.efficientnet import classifier
    from qcompile.zoo.images import images

    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", ["batch", 3, 224, 224])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 1000])]
    x = images("calib", 5, seed=2)
    reference = classifier()
    for batch in (x[:1], x[1:]):
        (got,) = session.run(None, {"image": batch})
        with torch.no_grad():
            want = reference(torch.from_numpy(batch)).numpy()
        assert got.shape == (len(batch), 1000) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-4
    (alone,) = session.run(None, {"image": x[2:3]})
    np.testing.assert_allclose(alone[0], got[1], atol=1e-4)  # a row does not depend on its batch


@slow
def test_predictions_on_real_photos_are_plausible(session):
    from qcompile.zoo import images

    views = np.concatenate([images.center_view(name) for name in images.PHOTOS])
    (logits,) = session.run(None, {"image": views})
    top5 = np.argsort(-logits, axis=1)[:, :5]
    print("\nwhole photos, top-5:", {name: [_name(i) for i in t] for name, t in zip(images.PHOTOS, top5)})
    assert 698 in top5[0]  # china.jpg: palace
    assert 985 in top5[1]  # flower.jpg (a dahlia, not an ImageNet class): daisy

    specs = images.samples("eval", 64, seed=0)
    x = images.images("eval", 64, seed=0)
    keep = [i for i, s in enumerate(specs) if s.source != "digits"]
    x = x[keep]
    probs = _softmax(session.run(None, {"image": x})[0])
    flipped = _softmax(session.run(None, {"image": np.ascontiguousarray(x[..., ::-1])})[0])
    top, top_flip, conf = probs.argmax(1), flipped.argmax(1), probs.max(1)
    agree = float((top == top_flip).mean())
    by_photo = {name: Counter(_name(int(t)) for t, i in zip(top, keep) if specs[i].source == name).most_common(4)
                for name in images.PHOTOS}
    print(f"eval photo crops: {len(keep)}, max softmax {conf.max():.2f}, mean {conf.mean():.2f}, "
          f"crop/mirror top-1 agreement {agree:.2f}; most frequent top-1: {by_photo}")
    assert conf.max() >= 0.5  # confident on some crops
    assert agree >= 0.6  # the same prediction on a crop and its mirror image for most crops


@slow
def test_image_splits_disjoint_and_deterministic():
    from qcompile.zoo import images

    n = 96
    calib, evals = images.samples("calib", n), images.samples("eval", n)
    assert Counter(s.source for s in calib) == Counter(s.source for s in evals) == {
        "china": 36, "flower": 36, "digits": 24}
    for split, specs in (("calib", calib), ("eval", evals)):
        top, left, bottom, right = images.region(split)
        for s in specs:
            if s.source == "digits":
                assert s.box is None and s.digits and all(d % 2 == images.SPLITS.index(split) for d in s.digits)
            else:
                y0, x0, y1, x1 = s.box
                assert top <= y0 < y1 <= bottom and left <= x0 < x1 <= right
    assert images.region("calib")[2] <= images.region("eval")[0]  # calib rows end where eval rows start
    assert not {d for s in calib for d in s.digits} & {d for s in evals for d in s.digits}
    assert len({s.box for s in calib if s.box}) == sum(1 for s in calib if s.box)  # no repeated crop
    assert {s.flip for s in calib} == {False, True}

    a = images.images("calib", 24)
    np.testing.assert_array_equal(a, images.images("calib", 24, seed=0))
    np.testing.assert_array_equal(a[:10], images.images("calib", 10))  # prefix-stable
    assert not np.array_equal(a, images.images("calib", 24, seed=1))
    b = images.images("eval", 24)
    assert not any(np.array_equal(u, v) for u in a for v in b)
    assert a.min() >= -127 / 128 and a.max() <= 1.0
    with pytest.raises(ValueError):
        images.images("train", 1)


@slow
def test_write_npz_and_get_data(tmp_path):
    from qcompile.zoo import images

    path = images.write_npz(tmp_path / "calib", "calib", 12)
    assert path == tmp_path / "calib" and path.is_file()
    with np.load(path) as data:
        assert data.files == ["image"]
        arr = data["image"]
    assert arr.shape == (12, 3, 224, 224) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, images.images("calib", 12))

    cached = zoo.get_data(MODEL, "eval", 8, cache_dir=tmp_path / "cache")
    assert cached == tmp_path / "cache" / f"{MODEL}.eval.8.npz"
    with np.load(cached) as data:
        assert data.files == ["image"] and data["image"].shape == (8, 3, 224, 224)
        np.testing.assert_array_equal(data["image"], images.images("eval", 8))
    mtime = cached.stat().st_mtime_ns
    assert zoo.get_data(MODEL, "eval", 8, cache_dir=tmp_path / "cache") == cached
    assert cached.stat().st_mtime_ns == mtime
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        zoo.get_data(MODEL, "train", 8, cache_dir=tmp_path / "cache")
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
