"""Build the bundled example model: a small MLP trained on scikit-learn's digits, exported to ONNX.

    python models/make_example.py          # rewrites the three files below, next to this script

Writes
  digits_mlp.onnx    pixels float32 [N, 64] -> Gemm+Relu (128) -> Gemm+Relu (64) -> Gemm -> logits [N, 10]
  digits_calib.npz   {"pixels": float32 [512, 64]}  training images (calibration data)
  digits_eval.npz    {"pixels": float32 [256, 64], "labels": int64 [256]}  held-out test images
                     (never trained on) and their digits; qcompile reads only the model's inputs

Inputs are the raw 8x8 digit intensities of ``sklearn.datasets.load_digits`` (0..16), flattened
row by row. The network is scikit-learn's ``MLPClassifier`` (ReLU, Adam, fixed random_state),
trained on float32 data so its weights are float32 too; the ONNX graph is written by hand with
``onnx.helper`` and must reproduce ``predict_proba``'s argmax on every digit image (asserted below).
The ONNX output is the logits (softmax is monotonic, so the argmax is the same).

Needs only numpy, scikit-learn and onnx; not run by CI (the files are committed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
SEED = 0
HIDDEN = (128, 64)
N_EVAL = 256
N_CALIB = 512
INPUT, OUTPUT = "pixels", "logits"
OPSET, IR_VERSION = 17, 8  # onnxruntime 1.31 accepts IR <= 13; IR 8 is the opset-17 era


def train():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=N_EVAL, random_state=SEED, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, activation="relu", solver="adam",
                        alpha=1e-3, max_iter=300, random_state=SEED)
    clf.fit(x_train, y_train)
    return clf, (x, y), (x_train, y_train), (x_test, y_test)


def export(clf) -> onnx.ModelProto:
    """Gemm (+ Relu) per layer; weights as sklearn stores them ([in, out]), transB=0."""
    if clf.activation != "relu" or clf.out_activation_ != "softmax":
        raise ValueError("export handles ReLU hidden layers and a softmax output only")
    nodes, inits = [], []
    prev = INPUT
    n_layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        last = i == n_layers - 1
        inits += [numpy_helper.from_array(np.asarray(w, np.float32), f"fc{i + 1}.weight"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"fc{i + 1}.bias")]
        out = OUTPUT if last else f"fc{i + 1}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i + 1}.weight", f"fc{i + 1}.bias"], [out],
                                      name=f"fc{i + 1}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i + 1}"], name=f"relu{i + 1}"))
            out = f"relu{i + 1}"
        prev = out
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="qcompile/models/make_example.py")
    model.doc_string = (f"sklearn MLPClassifier{HIDDEN} (ReLU) on sklearn digits; input: raw 8x8 "
                        "intensities 0..16 flattened to 64 float32; output: 10 class logits")
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    import onnxruntime as ort

    clf, (x_all, _), (x_train, _), (x_test, y_test) = train()
    model = export(clf)

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run([OUTPUT], {INPUT: x_all})[0]
    want = clf.predict_proba(x_all).argmax(1)
    got = logits.argmax(1)
    assert (got == want).all(), f"ONNX argmax differs from sklearn on {(got != want).sum()} of {len(want)} images"
    test_acc = float((sess.run([OUTPUT], {INPUT: x_test})[0].argmax(1) == y_test).mean())

    rng = np.random.default_rng(SEED)
    calib = x_train[np.sort(rng.choice(len(x_train), N_CALIB, replace=False))]
    onnx.save(model, HERE / "digits_mlp.onnx")
    np.savez_compressed(HERE / "digits_calib.npz", **{INPUT: calib})
    # qcompile reads only the arrays named like model inputs; "labels" is for the tests' accuracy check
    np.savez_compressed(HERE / "digits_eval.npz", **{INPUT: x_test, "labels": y_test.astype(np.int64)})
    print(f"sklearn {clf.n_iter_} epochs; ONNX == sklearn argmax on all {len(x_all)} images; "
          f"test accuracy {test_acc:.4f} on {len(x_test)} held-out images")
    for name in ("digits_mlp.onnx", "digits_calib.npz", "digits_eval.npz"):
        print(f"  {name}: {(HERE / name).stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
