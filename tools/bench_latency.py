"""Does pruning make models faster? FLOPs removed against latency measured on onnxruntime.

    python tools/bench_latency.py [--models resnet50,bert_base] [--providers cpu] [--runs 30]
                                  [--threads 1,0] [--round-to auto] [--criterion l2] [--out latency.md]

Models (random weights, real architectures, exported with torch's legacy exporter at deployment
shapes): torchvision ResNet-50, MobileNetV2, MobileNetV3 small and large, EfficientNet-B0,
ShuffleNetV2 x1.0, RegNetY-400MF, ConvNeXt-Tiny and ViT-B/16 at 1x3x224x224, and Hugging Face
BERT-base at batch 1, sequence 128. Each is pruned by `spa.prune` (validated) at `--ratio 0.3`,
`--target-flops 0.5` and `--target-latency 0.5`, once per thread count (the width table and the
latency search are measured at the thread count the row is timed at), then timed with
`spa.verify.bench` (dense and pruned alternating).

efficiency = speedup / (dense FLOPs / pruned FLOPs): 1.0 means latency fell exactly as FLOPs did.
"measuring" is the time spa spent timing: the width table (cold: measured; warm: from the cache)
and the target search. Exports are cached in ~/.cache/spa/bench-latency (SPA_BENCH_DIR moves them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import spa  # noqa: E402
from spa.core.runtime import resolve_providers  # noqa: E402
from spa.formats.files import save_model  # noqa: E402
from spa.verify.bench import bench  # noqa: E402

MODELS = (
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "convnext_tiny",
    "vit_b_16",
    "bert_base",
)
SETTINGS = (
    ("ratio 0.3", {"ratio": 0.3}),
    ("target-flops 0.5", {"target_flops": 0.5}),
    ("target-latency 0.5", {"target_latency": 0.5}),
)
CACHE = Path(os.environ.get("SPA_BENCH_DIR", Path.home() / ".cache" / "spa" / "bench-latency"))


def export(name: str) -> Path:
    path = CACHE / f"{name}.onnx"
    if path.exists():
        return path
    import torch
    from zoo import _randomise_norms, import_torchvision

    CACHE.mkdir(parents=True, exist_ok=True)
    tv = import_torchvision()
    torch.manual_seed(0)
    if name == "bert_base":
        model, args, names = _bert()
    else:
        model = getattr(tv.models, name)(weights=None)
        args, names = (torch.randn(1, 3, 224, 224),), (["image"], ["logits"])
    model.eval()
    _randomise_norms(model)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(tmp), dynamo=False, opset_version=17, input_names=names[0], output_names=names[1]
        )
    os.replace(tmp, path)
    return path


def _bert():
    import torch
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):  # keyword arguments, plain tensor outputs: what the exporter wants
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig())

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    ids = torch.randint(0, BertConfig().vocab_size, (1, 128))
    return (
        Encoder(),
        (ids, torch.ones(1, 128, dtype=torch.int64)),
        (["input_ids", "attention_mask"], ["last_hidden_state", "pooler_output"]),
    )


def run(names, providers, runs: int, round_to, criterion: str, thread_counts, out_dir: Path, settings) -> list[dict]:
    rows = []
    for name in names:
        dense = export(name)
        for label, options in settings:
            for threads in thread_counts:
                rows.extend(_row(name, dense, label, options, providers, threads, runs, round_to, criterion, out_dir))
    return rows


def _row(name, dense, label, options, providers, threads, runs, round_to, criterion, out_dir) -> list[dict]:
    start = time.perf_counter()
    # the width table and the latency search time on the first provider at the row's thread count
    on_first = {"threads": threads, "providers": (providers[0],)}
    result = spa.prune(dense, criterion=criterion, round_to=round_to, bench=False, **on_first, **options)
    seconds = time.perf_counter() - start
    pruned = out_dir / f"{name}.{label.replace(' ', '_')}.t{threads}.onnx"
    save_model(result.model, pruned)
    r = result.report
    flops_ratio = r.flops_after / r.flops_before
    measuring = r.seconds.get("widths", 0.0) + r.seconds.get("search", 0.0)
    rows = []
    for provider in providers:
        timed = bench([dense, pruned], provider, threads, warmup=5, runs=runs)
        rows.append(
            {
                "model": name,
                "setting": label,
                "provider": provider,
                "threads": threads,
                "flops_ratio": flops_ratio,
                "params_ratio": r.params_after / r.params_before,
                "dense_ms": timed.timings["dense"].median_ms,
                "pruned_ms": timed.timings["pruned"].median_ms,
                "speedup": timed.speedup,
                "efficiency": timed.speedup * flops_ratio,
                "prune_s": seconds,
                "measuring_s": measuring,
                "widths": r.widths or {},
                "searched": _searched(r),
            }
        )
        print(
            f"{name:18} {label:18} {provider:22} {threads or 'all'} thr  FLOPs x{flops_ratio:.3f}  "
            f"speedup {timed.speedup:.2f}x  eff {timed.speedup * flops_ratio:.2f}  measuring {measuring:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _searched(report) -> str:
    """What was measured: the width table (timings measured / cached), the latency the target search saw."""
    notes = []
    if report.widths:
        w = report.widths
        notes.append(f"widths {w['measured']} measured / {w['cached']} cached in {w['seconds']:.1f} s")
    if report.target and report.target.metric == "latency":
        t = report.target
        notes.append(f"search: {t.achieved:.3f} of dense ({'met' if t.met else 'NOT met'}, {len(t.probes)} probes)")
    if report.target and report.target.allocation:
        notes.append(f"cut spread by {report.target.allocation}")
    return "; ".join(notes)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | setting | FLOPs kept | params kept | provider | threads | dense ms | pruned ms | speedup | "
        "efficiency | measuring s | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threads = "1" if r["threads"] == 1 else "all"
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['flops_ratio']:.1%} | {r['params_ratio']:.1%} | "
            f"{r['provider'].replace('ExecutionProvider', '')} | {threads} | {r['dense_ms']:.2f} | "
            f"{r['pruned_ms']:.2f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['measuring_s']:.1f} | "
            f"{r['searched']} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The figures the benchmark is judged on, per provider and thread count."""
    out = []
    slower = [f"{r['model']} {r['setting']} ({r['threads'] or 'all'} threads)" for r in rows if r["speedup"] < 1]
    out.append(f"pruned slower than dense: {', '.join(slower) if slower else 'none'}")
    for threads in sorted({r["threads"] for r in rows}):
        flops_rows = [r for r in rows if r["setting"].startswith("target-flops") and r["threads"] == threads]
        if flops_rows:
            median = statistics.median(r["efficiency"] for r in flops_rows)
            out.append(f"target-flops 0.5, {threads or 'all'} threads: median efficiency {median:.2f}")
        for r in rows:
            if r["setting"].startswith("target-latency") and r["threads"] == threads:
                out.append(
                    f"target-latency 0.5, {r['model']}, {threads or 'all'} threads: pruned/dense "
                    f"{1 / r['speedup']:.3f} (off by {abs(1 / r['speedup'] / 0.5 - 1):.1%})"
                )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--round-to", default="auto", help="a channel multiple, or 'auto' (the default)")
    parser.add_argument("--criterion", default="l2", help="how channels are ranked (default l2: no statistics)")
    parser.add_argument("--threads", default="1,0", help="thread counts to prune and time at (0: all)")
    parser.add_argument("--settings", help="only the rows whose setting starts with this (e.g. target-flops)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    providers = resolve_providers([p.strip() for p in args.providers.split(",") if p.strip()])
    out_dir = CACHE / "pruned"
    out_dir.mkdir(parents=True, exist_ok=True)
    thread_counts = [int(t) for t in args.threads.split(",")]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    settings = [s for s in SETTINGS if not args.settings or s[0].startswith(args.settings)]
    rows = run(names, providers, args.runs, round_to, args.criterion, thread_counts, out_dir, settings)
    text = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in verdicts(rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
