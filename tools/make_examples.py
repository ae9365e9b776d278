"""Build the example models shipped in models/ (run once; the files are committed).

    python tools/make_examples.py

mini_resnet.onnx: a small residual CNN with a squeeze-excitation gate, a
depthwise block, a channel concat and a flatten into a classifier: the
patterns spa must couple, in a file small enough to ship (random weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "models"


def block(cin, cout, k=3, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class MiniResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = block(3, 32)
        self.res = nn.Sequential(block(32, 32), nn.Conv2d(32, 32, 3, padding=1))
        self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.down = nn.Sequential(block(32, 64, 1), nn.MaxPool2d(2))
        self.depthwise = block(64, 64, 3, groups=64)
        self.branch_a, self.branch_b = block(64, 32, 1), block(64, 32, 3)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, classes)

    def forward(self, x):
        x = self.stem(x)
        r = self.res(x)
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(r.mean((2, 3), keepdim=True)))))
        x = torch.relu(x + r * gate)
        x = self.depthwise(self.down(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], 1)
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(x), 1))))


def main() -> int:
    torch.manual_seed(0)
    model = MiniResNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    OUT.mkdir(exist_ok=True)
    path = OUT / "mini_resnet.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    print(path, path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
