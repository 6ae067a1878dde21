"""Random-weight Llama decoder export (qcompile.zoo.llama): structure, numerics, dynamic shapes."""
from __future__ import annotations

import numpy as np
import pytest

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(path, figures) of the model exported and verified once into a private dir."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qcompile.zoo import llama

    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    return path, llama.build(path)


@pytest.fixture(scope="module")
def session(built):
    import onnxruntime as ort

    return ort.InferenceSession(str(built[0]), providers=["CPUExecutionProvider"])


@slow
def test_build_figures_and_structure(built):
    import onnx

    from qcompile.zoo import llama

    path, info = built
    assert info["max_abs_diff"] <= 1e-4
    assert info["file_bytes"] == path.stat().st_size > 80e6
    assert 20e6 < info["parameters"] < 22e6  # 21.2M: 2 x 8192 x 512 embeddings + 4 layers
    assert info["export_seconds"] > 0 and len(info["sha256"]) == 64

    model = onnx.load(str(path))  # one self-contained file
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 26
    # Every parameter is an initializer (the small rest: rotary inv_freq and scalar constants);
    # the 2 x 4 + 1 RMSNorm weights are distinct, not merged into one shared constant.
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer]
    assert sum(n for n in sizes if n >= 512) == info["parameters"]
    assert sizes.count(512) == 2 * llama.CONFIG["num_hidden_layers"] + 1
    assert not any(p.key == "pkg.torch.onnx.stack_trace"
                   for n in model.graph.node for p in n.metadata_props)

    ops = [n.op_type for n in model.graph.node]
    layers = llama.CONFIG["num_hidden_layers"]
    rms_norm = {"RMSNormalization", "SimplifiedLayerNormalization"} & set(ops)
    if not rms_norm:  # decomposed: x * 1/sqrt(mean(x^2) + eps), once per norm (2 per layer + final)
        for op in ("Pow", "ReduceMean", "Sqrt"):
            assert ops.count(op) >= 2 * layers + 1, (op, ops.count(op))
    assert ops.count("Softmax") == layers  # eager attention, one per layer
    # 7 projections per layer (q, k, v, o, gate, up, down) + 2 attention MatMuls + the LM head
    assert ops.count("MatMul") >= 9 * layers + 1
    assert "Sigmoid" in ops  # SiLU of the SwiGLU gate
    assert {"Sin", "Cos"} <= set(ops)  # rotary embedding


@slow
def test_dynamic_shapes_in_onnxruntime(session):
    from qcompile.zoo import llama

    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    vocab = llama.CONFIG["vocab_size"]
    for batch, seq in ((2, 5), (4, 64)):
        feeds = llama.feeds(batch, seq, seed=100 + seq)
        (logits,) = session.run(None, feeds)
        assert logits.shape == (batch, seq, vocab) and logits.dtype == np.float32
        assert np.isfinite(logits).all() and logits.std() > 0.1
        # Causal and batch-independent: a row alone, truncated to its unpadded prefix, gives the
        # same logits as in the padded batch.
        for i in (0, batch - 1):
            n = int(feeds["attention_mask"][i].sum())
            alone = {k: v[i:i + 1, :n] for k, v in feeds.items()}
            (row,) = session.run(None, alone)
            np.testing.assert_allclose(row[0], logits[i, :n], atol=1e-4)


@slow
def test_matches_torch_on_new_shape(built, session):
    import torch

    from qcompile.zoo import llama

    feeds = llama.feeds(2, 33, seed=7)
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = llama.model()(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert np.abs(got - want).max() <= 1e-4


@slow
def test_write_npz(tmp_path, session):
    from qcompile.zoo import llama

    path = llama.write_npz(tmp_path / "calib", "calib", 6, seq=16)
    assert path == tmp_path / "calib" and path.is_file()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    assert sorted(arrays) == sorted(i.name for i in session.get_inputs())
    ids = arrays["input_ids"]
    assert ids.shape == arrays["attention_mask"].shape == (6, 16)
    assert ids.dtype == arrays["attention_mask"].dtype == np.int64
    assert (arrays["attention_mask"] == 1).all()
    assert 0 <= ids.min() and ids.max() < llama.CONFIG["vocab_size"]
    (logits,) = session.run(None, arrays)
    assert logits.shape == (6, 16, llama.CONFIG["vocab_size"])

    def ids_of(split, n=6, seed=0):
        with np.load(llama.write_npz(tmp_path / f"{split}-{seed}.npz", split, n, 16, seed)) as d:
            return d["input_ids"]

    np.testing.assert_array_equal(ids_of("calib"), ids)  # deterministic
    assert not np.array_equal(ids_of("eval"), ids)  # splits use different streams
    assert not np.array_equal(ids_of("calib", seed=1), ids)
    with pytest.raises(ValueError):
        llama.write_npz(tmp_path / "x.npz", "train", 1)
