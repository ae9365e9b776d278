"""How analysis time and memory grow with the size of the graph.

    python tools/bench_scale.py [--cases chain,fanin-sum,...] [--sizes ...] [--json [PATH]]
                                [--repeat 3] [--timeout 300] [--max-rss-gb 6] [--root CHECKOUT]

Generates weight-light graphs and runs ``spa.analyze`` on each in a fresh process, so the
peak resident memory printed belongs to that case alone:

* ``chain``: N nodes of MatMul -> Add -> Relu blocks (4x4 weights), 1k / 10k / 100k nodes;
* ``conv-chain``: N nodes of Conv -> Relu blocks (4x4x1x1 weights);
* ``long-group``: a MatMul, N - 2 alternating Relu and Add (bias) ops, a MatMul: one group
  of N dimensions;
* ``fanin-sum``: one input, N MatMul branches, one Sum node of N inputs, a MatMul after it
  (so the summed channels form one prunable group), 100 / 1,000 / 5,000 branches;
* ``fanin-adds``: the same branches summed by a chain of N - 1 Adds;
* ``fanin-concat``: the same branches concatenated, then one MatMul;
* ``fanout-split``: one MatMul, a Split into N parts, a MatMul on each, their Sum.

Each row gives the CPU time of each stage of ``analyze`` (load, canonicalize, shape inference,
grouping, counting) and of the whole, its growth over the size before ("x prev"), the wall
time, the peak RSS and its growth over the RSS after imports, and the groups found. CPU time,
not wall time, is what the ratio compares: on a shared machine it is the steadier of the two,
and of ``--repeat`` runs the one with the least is kept.
``--json`` also writes the figures to tools/results/bench_scale.json (or PATH); ``--root``
measures the spa of another checkout, for figures before and after a change. A case past
``--timeout`` seconds or ``--max-rss-gb`` is stopped and reported as such. The target: ten times
the nodes or branches costs at most twelve times the time, and 5,000 branches analyse in
under 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results" / "bench_scale.json"
SIZES = {
    "chain": (1_000, 10_000, 100_000),
    "conv-chain": (1_000, 10_000, 100_000),
    "long-group": (1_000, 10_000, 100_000),
    "fanin-sum": (100, 1_000, 5_000),
    "fanin-adds": (100, 1_000, 5_000),
    "fanin-concat": (100, 1_000, 5_000),
    "fanout-split": (100, 1_000, 5_000),
}
DEFAULT_CASES = tuple(SIZES)
WIDTH = 4


def _weight(rng, name: str, *shape) -> TensorProto:
    return numpy_helper.from_array(rng.uniform(-1, 1, shape).astype(np.float32), name)


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "scale", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def chain(n: int) -> onnx.ModelProto:
    """MatMul -> Add -> Relu blocks, n nodes in all."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(max(1, n // 3)):
        inits += [_weight(rng, f"w{k}", WIDTH, WIDTH), _weight(rng, f"b{k}", WIDTH)]
        nodes += [
            helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"matmul{k}"),
            helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"], name=f"add{k}"),
            helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}"),
        ]
        x = f"r{k}"
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTH])],
    )


def conv_chain(n: int) -> onnx.ModelProto:
    """Conv -> Relu blocks, n nodes in all."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(max(1, n // 2)):
        inits.append(_weight(rng, f"w{k}", WIDTH, WIDTH, 1, 1))
        nodes += [
            helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], name=f"conv{k}"),
            helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"),
        ]
        x = f"r{k}"
    shape = [1, WIDTH, 2, 2]
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
    )


def long_group(n: int) -> onnx.ModelProto:
    """A MatMul, n - 2 Relu and Add ops, a MatMul: one group of about n dimensions."""
    rng = np.random.default_rng(0)
    inits = [_weight(rng, "w_in", WIDTH, WIDTH), _weight(rng, "w_out", WIDTH, WIDTH)]
    nodes, x = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="first")], "h"
    for k in range(max(0, n - 2)):
        if k % 2:
            inits.append(_weight(rng, f"b{k}", WIDTH))
            nodes.append(helper.make_node("Add", [x, f"b{k}"], [f"t{k}"], name=f"add{k}"))
        else:
            nodes.append(helper.make_node("Relu", [x], [f"t{k}"], name=f"relu{k}"))
        x = f"t{k}"
    nodes.append(helper.make_node("MatMul", [x, "w_out"], ["y"], name="last"))
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
    )


def fanin(n: int, combine: str) -> onnx.ModelProto:
    """One input read by n MatMul branches whose outputs are combined, then one MatMul."""
    rng = np.random.default_rng(0)
    nodes, inits, branches = [], [], []
    for k in range(n):
        inits.append(_weight(rng, f"w{k}", WIDTH, WIDTH))
        nodes.append(helper.make_node("MatMul", ["x", f"w{k}"], [f"m{k}"], name=f"branch{k}"))
        branches.append(f"m{k}")
    if combine in ("Sum", "Concat"):
        nodes.append(
            helper.make_node(combine, branches, ["s"], name="combine", **({"axis": 1} if combine == "Concat" else {}))
        )
        total = "s"
    else:
        total = branches[0]
        for k, branch in enumerate(branches[1:]):
            nodes.append(helper.make_node("Add", [total, branch], [f"s{k}"], name=f"add{k}"))
            total = f"s{k}"
    inits.append(_weight(rng, "head", WIDTH * (n if combine == "Concat" else 1), WIDTH))
    nodes.append(helper.make_node("MatMul", [total, "head"], ["y"], name="head"))
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
    )


def fanout(n: int) -> onnx.ModelProto:
    """One MatMul whose output a Split cuts into n parts, a MatMul on each, their Sum."""
    rng = np.random.default_rng(0)
    inits = [_weight(rng, "w", WIDTH, WIDTH * n)] + [_weight(rng, f"v{k}", WIDTH, WIDTH) for k in range(n)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("Split", ["h"], [f"p{k}" for k in range(n)], name="split", axis=1, num_outputs=n),
    ]
    nodes += [helper.make_node("MatMul", [f"p{k}", f"v{k}"], [f"q{k}"], name=f"branch{k}") for k in range(n)]
    nodes.append(helper.make_node("Sum", [f"q{k}" for k in range(n)], ["y"], name="sum"))
    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])  # Split's num_outputs


BUILDERS = {
    "chain": chain,
    "conv-chain": conv_chain,
    "long-group": long_group,
    "fanin-sum": lambda n: fanin(n, "Sum"),
    "fanin-adds": lambda n: fanin(n, "Adds"),
    "fanin-concat": lambda n: fanin(n, "Concat"),
    "fanout-split": fanout,
}

# Run in the child: time each stage of the real ``analyze`` by wrapping what it calls.
_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import spa.api as api

def status(field):
    # VmHWM, not ru_maxrss: the latter carries over the parent's peak across fork and exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

stages = {}
def timed(stage, fn):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[stage] = stages.get(stage, 0.0) + time.process_time() - start
    return wrapper

import spa.formats.model as model_io
import spa.pipeline.analyzed as analyzed
for module, stage, name in ((model_io, "load", "load_model"), (model_io, "canonicalize", "canonicalize"),
                            (model_io, "shapes", "infer_shapes"), (analyzed, "group", "find_groups"),
                            (analyzed, "count", "count_model")):
    setattr(module, name, timed(stage, getattr(module, name)))
before = status("VmRSS")
start, cpu = time.perf_counter(), time.process_time()
report = api.analyze(sys.argv[1])
total, cpu = time.perf_counter() - start, time.process_time() - cpu
peak = status("VmHWM")
print(json.dumps({"seconds": total, "cpu_seconds": cpu, "stages": stages, "peak_rss": peak, "rss_before": before,
                  "groups": len(report.groups), "prunable": len(report.prunable)}))
"""


def _run_case(path: Path, root: Path, timeout: float, max_rss: int) -> dict:
    """Analyse in a fresh process, stopped past ``timeout`` seconds or ``max_rss`` bytes resident."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    start, peak = time.monotonic(), 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/statm") as f:
                peak = max(peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, IndexError):
            pass
        elapsed = time.monotonic() - start
        if elapsed > timeout or peak > max_rss:
            child.kill()
            child.wait()
            why = f"timeout {timeout:.0f} s" if elapsed > timeout else f"RSS over {max_rss / 2**30:.1f} GB"
            return {"stopped": why, "seconds": elapsed, "peak_rss": peak}
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode:
        return {"stopped": f"exit {child.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return json.loads(out.strip().splitlines()[-1])


def _best_of(repeat: int, *case) -> dict:
    """The run with the least CPU time of ``repeat`` fresh runs (the least disturbed by whatever else
    the machine runs), with the highest peak RSS of them; stops at the first that is stopped."""
    runs = []
    for _ in range(repeat):
        runs.append(_run_case(*case))
        if "stopped" in runs[-1]:
            return runs[-1]
    best = min(runs, key=lambda run: run["cpu_seconds"])
    return {**best, "peak_rss": max(run["peak_rss"] for run in runs), "repeats": repeat}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma list of {', '.join(BUILDERS)}")
    parser.add_argument("--sizes", help="comma list of sizes, replacing each case's own")
    parser.add_argument(
        "--repeat", type=int, default=3, help="fresh runs per case, the least CPU time kept (default 3)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case (default 300)")
    parser.add_argument("--max-rss-gb", type=float, default=6, help="resident memory cap per case (default 6)")
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="checkout whose spa is measured (default: this one), to compare two versions",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const=RESULTS,
        type=Path,
        metavar="PATH",
        help=f"also write the figures as JSON (default {RESULTS.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in BUILDERS]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; one of {', '.join(BUILDERS)}")
    rows = []
    header = (
        f"{'case':<12} {'size':>7} {'file kB':>8} {'load':>6} {'canon':>6} {'shapes':>6} {'group':>6} "
        f"{'count':>6} {'cpu s':>7} {'x prev':>6} {'wall s':>7} {'peak MB':>8} {'+MB':>7} {'groups':>7}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="spa-bench-scale-") as tmp:
        for case in cases:
            sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES[case]
            previous = None
            for size in sizes:
                path = Path(tmp) / f"{case}-{size}.onnx"
                onnx.save(BUILDERS[case](size), str(path))
                result = _best_of(args.repeat, path, args.root, args.timeout, int(args.max_rss_gb * 2**30))
                row = {"case": case, "size": size, "file_bytes": path.stat().st_size, **result}
                rows.append(row)
                path.unlink()
                kb = row["file_bytes"] / 1024
                if "stopped" in result:
                    print(
                        f"{case:<12} {size:>7} {kb:>8.0f}  stopped after {result.get('seconds', 0):.0f} s: "
                        f"{result['stopped']}"
                    )
                    previous = None
                    continue
                st = result["stages"]
                ratio = f"{result['cpu_seconds'] / previous:.1f}" if previous else ""
                previous = result["cpu_seconds"]
                stages = " ".join(f"{st.get(s, 0):>6.2f}" for s in ("load", "canonicalize", "shapes", "group", "count"))
                print(
                    f"{case:<12} {size:>7} {kb:>8.0f} {stages} {result['cpu_seconds']:>7.2f} {ratio:>6} "
                    f"{result['seconds']:>7.2f} {result['peak_rss'] / 2**20:>8.0f} "
                    f"{(result['peak_rss'] - result['rss_before']) / 2**20:>7.0f} {result['groups']:>7}",
                    flush=True,
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "root": str(args.root),
                    "python": sys.version.split()[0],
                    "onnx": onnx.__version__,
                    "cpus": os.cpu_count(),
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
