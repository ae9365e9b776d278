"""Prune a ~3 GB model with external data and report wall time and peak memory.

    python tools/bench_large.py [--layers 14] [--ratio 0.3] [--keep]

Builds a random-weight Llama-style decoder (RMSNorm, grouped-query attention
with RoPE, SwiGLU MLP; hidden 2048, 16 query / 4 key-value heads, MLP 5632,
vocabulary 32000: about 760M parameters, 3 GB in float32) in torch, exports
it with the dynamo exporter to ONNX with external data (cached), then runs
`spa prune --ratio 0.3` in a fresh process and prints its wall time and peak
RSS next to the model's size on disk. The figure spa is held to: peak RSS at most 1.5x that size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, layers: int) -> None:
    import torch
    from torch import nn

    hidden, inter, heads, kv_heads, vocab = 2048, 5632, 16, 4, 32000
    head_dim = hidden // heads

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate_half(x):
        return torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], -1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(hidden, heads * head_dim, bias=False)
            self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.v = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.o = nn.Linear(heads * head_dim, hidden, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, heads, head_dim).transpose(1, 2)
            k = self.k(x).view(b, s, kv_heads, head_dim).transpose(1, 2)
            v = self.v(x).view(b, s, kv_heads, head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            attn = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, -1)
            return self.o((attn @ v).transpose(1, 2).reshape(b, s, heads * head_dim))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2, self.attn = RMSNorm(), RMSNorm(), Attention()
            self.gate = nn.Linear(hidden, inter, bias=False)
            self.up = nn.Linear(hidden, inter, bias=False)
            self.down = nn.Linear(inter, hidden, bias=False)

        def forward(self, x, cos, sin):
            x = x + self.attn(self.norm1(x), cos, sin)
            h = self.norm2(x)
            return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = RMSNorm()
            self.head = nn.Linear(hidden, vocab, bias=False)
            freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            angles = torch.outer(torch.arange(64).float(), freq)
            self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)
            self.register_buffer("sin", torch.cat([angles, angles], -1).sin(), persistent=False)

        def forward(self, ids):
            s = ids.shape[1]
            cos, sin = self.cos[:s], self.sin[:s]
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x, cos, sin)
            return self.head(self.norm(x))

    torch.manual_seed(0)
    model = Decoder().eval()
    ids = torch.randint(0, vocab, (1, 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids,),
            str(path),
            dynamo=True,
            external_data=True,
            input_names=["ids"],
            output_names=["logits"],
            verbose=False,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "spa" / "large"))
    parser.add_argument("--keep", action="store_true", help="keep the pruned output")
    args = parser.parse_args(argv)
    path = Path(args.dir) / f"decoder{args.layers}.onnx"
    if not path.exists():
        start = time.perf_counter()
        build(path, args.layers)
        print(f"built and exported {path} in {time.perf_counter() - start:.0f} s")
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    out = path.with_name(path.stem + ".pruned.onnx")
    report = path.with_name(path.stem + ".report.json")
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spa",
            "prune",
            str(path),
            "--ratio",
            str(args.ratio),
            "-o",
            str(out),
            "--force",
            "--json",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(done.stdout.strip() or done.stderr.strip())
    if done.returncode:
        return done.returncode
    data = json.loads(report.read_text())
    out_size = sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))
    print("\n| model on disk | pruned on disk | params | wall time | peak RSS | peak / size |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | {data['params_before'] / 1e6:.0f}M -> "
        f"{data['params_after'] / 1e6:.0f}M | {seconds:.0f} s | {peak / 2**30:.2f} GiB | {peak / size:.2f}x |"
    )
    if not args.keep:
        for leftover in out.parent.glob(out.name + "*"):
            leftover.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
