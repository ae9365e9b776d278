"""Does pruning make models faster? FLOPs removed against latency measured on onnxruntime.

    python tools/bench_latency.py [--models resnet50,bert_base] [--providers cpu] [--runs 30]
                                  [--round-to 1] [--out latency.md]

Models (random weights, real architectures, exported with torch's legacy exporter at deployment
shapes): torchvision ResNet-50, MobileNetV2, EfficientNet-B0 and ViT-B/16 at 1x3x224x224, and
Hugging Face BERT-base at batch 1, sequence 128. Each is pruned by `spa.prune` (validated) at
`--ratio 0.3`, `--ratio 0.5` and `--target-flops 0.5`, then timed with `spa.verify.bench` (dense and
pruned alternating) at 1 thread and at onnxruntime's default thread count.

efficiency = speedup / (dense FLOPs / pruned FLOPs): 1.0 means latency fell exactly as FLOPs did.
Exports are cached in ~/.cache/spa/bench-latency (SPA_BENCH_DIR moves them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
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

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16", "bert_base")
SETTINGS = (("ratio 0.3", {"ratio": 0.3}), ("ratio 0.5", {"ratio": 0.5}), ("target-flops 0.5", {"target_flops": 0.5}))
# the --target-latency rows: the search is expected to land within 5% of the target on these two
LATENCY_TARGET = 0.6
LATENCY_MODELS = ("resnet50", "bert_base")
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


def run(names, providers, runs: int, round_to, out_dir: Path) -> list[dict]:
    rows = []
    for name in names:
        dense = export(name)
        settings = list(SETTINGS)
        if name in LATENCY_MODELS:
            settings.append((f"target-latency {LATENCY_TARGET}", {"target_latency": LATENCY_TARGET}))
        for label, options in settings:
            start = time.perf_counter()
            # searches (--round-to auto, --target-latency) time on the first provider at 1 thread
            result = spa.prune(
                dense, criterion="l2", round_to=round_to, bench=False, threads=1, providers=(providers[0],), **options
            )
            seconds = time.perf_counter() - start
            pruned = out_dir / f"{name}.{label.replace(' ', '_')}.onnx"
            save_model(result.model, pruned)
            r = result.report
            flops_ratio = r.flops_after / r.flops_before
            for provider in providers:
                speedups = {}
                for threads in (1, 0):
                    timed = bench([dense, pruned], provider, threads, warmup=5, runs=runs)
                    speedups[threads] = timed.speedup
                    dense_ms = timed.timings["dense"].median_ms
                    pruned_ms = timed.timings["pruned"].median_ms
                    rows.append(
                        {
                            "model": name,
                            "setting": label,
                            "ratio": r.options["ratio"],
                            "round_to": r.options["round_to"],
                            "provider": provider,
                            "threads": threads,
                            "flops_ratio": flops_ratio,
                            "params_ratio": r.params_after / r.params_before,
                            "dense_ms": dense_ms,
                            "pruned_ms": pruned_ms,
                            "speedup": timed.speedup,
                            "efficiency": timed.speedup * flops_ratio,
                            "prune_s": seconds,
                            "searched": _searched(r) if threads == 1 and provider == providers[0] else "",
                        }
                    )
                print(
                    f"{name:16} {label:17} {provider:22} FLOPs x{flops_ratio:.3f}  speedup 1 thread "
                    f"{speedups[1]:.2f}x, all {speedups[0]:.2f}x",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _searched(report) -> str:
    """What the searches measured: the multiple round-to auto chose, the latency the target search saw."""
    notes = []
    if report.round_to_auto:
        notes.append(f"round-to {report.round_to_auto.chosen}")
    if report.target and report.target.metric == "latency":
        t = report.target
        notes.append(f"search: {t.achieved:.3f} of dense ({'met' if t.met else 'NOT met'}, {len(t.probes)} probes)")
    return "; ".join(notes)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | setting | ratio | FLOPs kept | provider | threads | dense ms | pruned ms | speedup | "
        "efficiency | pruned/dense | searched |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threads = "1" if r["threads"] == 1 else "all"
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['ratio']:.3f} | {r['flops_ratio']:.1%} | "
            f"{r['provider'].replace('ExecutionProvider', '')} | {threads} | {r['dense_ms']:.2f} | "
            f"{r['pruned_ms']:.2f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
            f"{1 / r['speedup']:.3f} | {r['searched']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--round-to", default="1", help="a channel multiple, or 'auto'")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    providers = resolve_providers([p.strip() for p in args.providers.split(",") if p.strip()])
    out_dir = CACHE / "pruned"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run([m.strip() for m in args.models.split(",") if m.strip()], providers, args.runs, round_to, out_dir)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    slower = [f"{r['model']} {r['setting']} ({r['threads'] or 'all'} threads)" for r in rows if r["speedup"] < 1]
    print(f"\npruned slower than dense: {', '.join(slower) if slower else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
