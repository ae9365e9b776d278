"""An evaluation for ``spa sweep --eval``: top-1 accuracy on the MNIST test split that ships in
models/data (1,000 labelled digits), for the MNIST models in models/. Copy it for your own data:

    spa sweep models/mnist_rescnn.onnx --ratios 0.1:0.6:0.1 --calib models/data/mnist_calib.npz \\
        --eval tools/sweep_eval_mnist.py:accuracy --html sweep.html

The sweep sees the annotation and hands the function an onnxruntime session on each pruned model
(``--eval-takes`` says so explicitly); it returns one number, higher is better."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

TEST = Path(__file__).resolve().parents[1] / "models" / "data" / "mnist_test.npz"


def accuracy(session: onnxruntime.InferenceSession) -> float:
    data = np.load(TEST)
    images, labels = data["input"], data["label"]
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(labels), 250):  # batches keep memory flat on a large model
        scores = session.run(None, {name: images[start : start + 250]})[0]
        correct += int((scores.argmax(1) == labels[start : start + 250]).sum())
    return correct / len(labels)


if __name__ == "__main__":
    import sys

    model = sys.argv[1] if len(sys.argv) > 1 else str(TEST.parents[1] / "mnist_rescnn.onnx")
    print(f"{model}: accuracy {accuracy(onnxruntime.InferenceSession(model)):.4f}")
