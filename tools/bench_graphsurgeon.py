"""spa's own graph jobs next to onnx-graphsurgeon's: wall time, peak memory, same result?

    pip install onnx-graphsurgeon
    python tools/bench_graphsurgeon.py [--runs 5] [--large PATH | --no-large] [--resnet PATH]
    python tools/bench_graphsurgeon.py --checks      # behaviours on small crafted models

Three jobs, each run by spa's code (A) and by graphsurgeon (B) on the same model, loaded the
way spa loads it (``spa.formats.load.load_model``: external data stays on disk, memory-mapped):

* fold      A: ``spa.formats.canonicalize.canonicalize`` (Constant nodes -> initializers, Identity on weights
               elided, small constant subgraphs folded, dead initializers dropped)
            B: ``gs.import_onnx`` -> ``fold_constants()`` -> ``cleanup()`` -> ``gs.export_onnx``
* cleanup   the node producing the model's first output is removed (its computed input becomes the
            graph output, as after a cut), leaving its weights dead.
            A: spa's unread-initializer sweep (names read by nodes and their subgraphs, plus outputs)
            B: ``gs.import_onnx`` -> ``cleanup()`` -> ``gs.export_onnx``
* toposort  the node list is reversed first.
            A: ``spa.formats.export._sort_topologically`` (Kahn, earliest ready node first)
            B: ``gs.import_onnx`` -> ``toposort()`` -> ``gs.export_onnx``

Each measurement is a fresh subprocess; A and B alternate (A B A B ...) so that load from other
work on the machine falls on both alike; the table gives medians. "job" is the time of the job
alone (import and export included for graphsurgeon, model load excluded); "peak RSS" is the
subprocess's peak resident set (VmHWM, model load included; ``resource.getrusage``'s ru_maxrss is
not used because after fork+exec Linux reports the parent's peak there when it is larger), and
"job +RSS" the job's own peak over the RSS it started from (VmHWM reset through
/proc/self/clear_refs after loading). Linux only.
"same result" compares node count and op sequence, the initializer set (names, and for external
tensors their file references) and, where the model is small enough to run, onnxruntime's outputs
on one random input.

ResNet-50 is torchvision's, exported by torch's dynamo exporter (tools/zoo.py's cache, or exported
here to a temporary folder); the tiny Llama (tools/zoo.py's cache, skipped when absent) is a
legacy TorchScript export that leaves Constant nodes and shape arithmetic to fold; the large model
is tools/bench_large.py's ~3 GB decoder with external data (built by that script, or here with
``--build-large``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path.home() / ".cache" / "spa" / "zoo-2-torch2.13.0" / "dynamo" / "resnet50.onnx"
LARGE = Path.home() / ".cache" / "spa" / "large" / "decoder14.onnx"
# a legacy (TorchScript) export keeps Constant nodes and shape arithmetic: something to fold
FOLDABLE = Path.home() / ".cache" / "spa" / "zoo-2-torch2.13.0" / "attention" / "tiny_llama_gqa-legacy.onnx"
JOBS = ("fold", "cleanup", "toposort")


# ----------------------------------------------------------------------------- worker (one run)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Linux: reset VmHWM to the current RSS, so the job's own peak can be read afterwards."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _prepare(job: str, model):
    import onnx

    if job == "cleanup":  # remove the op producing the first output; its computed input becomes the output
        graph = model.graph
        index = next(i for i, n in enumerate(graph.node) if graph.output[0].name in n.output)
        producers = {name: n.op_type for n in graph.node for name in n.output}
        inits = {t.name for t in graph.initializer}
        source = next(
            name
            for name in graph.node[index].input
            if name and name not in inits and producers.get(name) not in ("Constant", "Identity")
        )
        del graph.node[index]
        del graph.output[:]
        graph.output.append(onnx.helper.make_empty_tensor_value_info(source))
        graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    elif job == "toposort":
        nodes = list(model.graph.node)[::-1]
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return model


def _spa(job: str, model):
    from spa.formats.canonicalize import _names_read, canonicalize
    from spa.formats.export import _sort_topologically

    if job == "fold":
        return canonicalize(model)
    if job == "cleanup":
        graph = model.graph
        read = _names_read(graph.node) | {o.name for o in graph.output} | {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        return model
    _sort_topologically(model.graph)
    return model


def _gs(job: str, model):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    if job == "fold":
        graph.fold_constants().cleanup()
    elif job == "cleanup":
        graph.cleanup()
    else:
        graph.toposort()
    return gs.export_onnx(graph)


def _signature(model) -> dict:
    from onnx.external_data_helper import uses_external_data

    ops = hashlib.sha1("|".join(n.op_type for n in model.graph.node).encode()).hexdigest()[:10]
    inits = []
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        if uses_external_data(t):
            ref = ",".join(f"{e.key}={e.value}" for e in t.external_data)
            inits.append(f"{t.name}@{ref}")
        else:
            inits.append(f"{t.name}:{hashlib.sha1(t.SerializeToString()).hexdigest()[:10]}")
    external = sum(1 for t in model.graph.initializer if uses_external_data(t))
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    order = all(_valid_order(model.graph))
    return {
        "nodes": len(model.graph.node),
        "ops": ops,
        "initializers": len(model.graph.initializer),
        "init_names": hashlib.sha1("\n".join(sorted(t.name for t in model.graph.initializer)).encode()).hexdigest()[
            :10
        ],
        "init_digest": hashlib.sha1("\n".join(inits).encode()).hexdigest()[:10],
        "external": external,
        "inline_bytes": inline,
        "sorted": order,
        "inputs": [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}],
        "graph_inputs": len(model.graph.input),
    }


def _valid_order(graph):
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        yield all(name in known for name in node.input)
        known.update(node.output)


def worker(job: str, who: str, path: str, out: str, save: str | None) -> None:
    import onnx_graphsurgeon  # noqa: F401  (imported by both candidates alike)
    import onnxruntime  # noqa: F401

    sys.path.insert(0, str(ROOT))
    from spa.formats.load import load_model

    model = load_model(path)
    model = _prepare(job, model)
    import gc

    gc.collect()
    loaded_rss = _status("VmRSS")
    loaded_peak = _status("VmHWM")  # not ru_maxrss: after fork+exec Linux reports the parent's peak there
    reset = _reset_peak()
    start = time.perf_counter()
    result = (_spa if who == "spa" else _gs)(job, model)
    seconds = time.perf_counter() - start
    job_peak = _status("VmHWM")
    peak = max(loaded_peak, job_peak)
    if not reset:  # peak could not be reset: the job's share is not separable
        job_peak = peak
    record = {
        "seconds": seconds,
        "peak": peak,
        "job_growth": job_peak - loaded_rss,
        "loaded_rss": loaded_rss,
        "loaded_peak": loaded_peak,
        **_signature(result),
    }
    if save:
        import onnx

        onnx.save(result, save)
    Path(out).write_text(json.dumps(record))


# ----------------------------------------------------------------------------- behaviour checks (--checks)
# Small crafted models, each showing one behaviour that matters to spa.


def _ort_run(model_or_path, feeds):
    import onnxruntime as ort

    data = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _gs_fold(model):  # what B does for the fold job
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(model)
    g.fold_constants().cleanup()
    return gs.export_onnx(g)


def _spa_fold(model):
    from spa.formats.canonicalize import canonicalize

    return canonicalize(model)


def initializer_input():
    # c is an initializer *and* a graph input: a default the caller may override
    c = numpy_helper.from_array(np.array([1, 2], np.float32), "c")
    two = numpy_helper.from_array(np.array([2, 2], np.float32), "two")
    g = helper.make_graph(
        [helper.make_node("Mul", ["c", "two"], ["d"]), helper.make_node("Add", ["x", "d"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [c, two],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros(2, np.float32), "c": np.array([10, 20], np.float32)}
    want = _ort_run(m, feeds)[0]
    out = {}
    for who, fn in (("spa", _spa_fold), ("gs", _gs_fold)):
        r = fn(m)
        ins = [i.name for i in r.graph.input]
        try:
            got = _ort_run(r, {k: v for k, v in feeds.items() if k in ins})[0]
            ok = bool(np.allclose(got, want))
        except Exception:  # noqa: BLE001  (an input the model no longer has)
            ok = False
        out[who] = f"inputs {ins}, nodes {len(r.graph.node)}, override honoured: {ok}"
    return out


def subgraph_if():
    # an If whose condition is a constant, whose branch reads an outer initializer w and folds w*2
    w = numpy_helper.from_array(np.array([3, 4], np.float32), "w")
    two = numpy_helper.from_array(np.array([2, 2], np.float32), "two")
    cond = numpy_helper.from_array(np.array(True), "cond")
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["w", "two"], ["w2"]), helper.make_node("Add", ["x", "w2"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["x", "w"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [w, two, cond],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.array([1, 1], np.float32)}
    want = _ort_run(m, feeds)[0]
    out = {}
    for who, fn in (("spa", _spa_fold), ("gs", _gs_fold)):
        r = fn(m)
        got = _ort_run(r, feeds)[0]
        out[who] = (
            f"ops {[n.op_type for n in r.graph.node]}, initializers {sorted(t.name for t in r.graph.initializer)}, "
            f"same output: {bool(np.allclose(got, want))}"
        )
    # cleanup alone, condition a graph input: the outer initializer read only inside a branch must stay
    import onnx_graphsurgeon as gs

    g2 = onnx.GraphProto()
    g2.CopyFrom(g)
    del g2.initializer[:]
    g2.initializer.extend([w, two])
    g2.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)])
    gg = gs.import_onnx(m2)
    gg.cleanup()
    r2 = gs.export_onnx(gg)
    got = _ort_run(r2, {"x": feeds["x"], "cond": np.array(False)})[0]
    want2 = _ort_run(m2, {"x": feeds["x"], "cond": np.array(False)})[0]
    out["gs cleanup, branch-only initializer"] = (
        f"kept {sorted(t.name for t in r2.graph.initializer)}, same output: {bool(np.allclose(got, want2))}"
    )
    return out


def opsets():
    out = {}
    for version in (11, 13):
        data = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(1, 6), "data")
        if version == 11:
            sq = helper.make_node("Squeeze", ["data"], ["s"], axes=[0])
            inits = [data]
        else:
            sq = helper.make_node("Squeeze", ["data", "axes"], ["s"])
            inits = [data, numpy_helper.from_array(np.array([0], np.int64), "axes")]
        g = helper.make_graph(
            [sq, helper.make_node("Add", ["x", "s"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
            inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", version)])
        m.ir_version = 7
        feeds = {"x": np.ones(6, np.float32)}
        want = _ort_run(m, feeds)[0]
        for who, fn in (("spa", _spa_fold), ("gs", _gs_fold)):
            r = fn(m)
            got = _ort_run(r, feeds)[0]
            out[f"{who} opset {version}"] = (
                f"ops {[n.op_type for n in r.graph.node]}, same output: {bool(np.allclose(got, want))}"
            )
    return out


def _external_model(folder: Path, mib: int):
    n = int((mib * 2**20 / 4) ** 0.5)
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    shape_c = numpy_helper.from_array(np.array([1, n], np.int64), "shape_c")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),  # a weight layout change: foldable
        helper.make_node("Reshape", ["shape_c", "one"], ["sc"]),  # small shape arithmetic: foldable
        helper.make_node("Reshape", ["x", "sc"], ["x2"]),
        helper.make_node("MatMul", ["x2", "wt"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), shape_c, numpy_helper.from_array(np.array([2], np.int64), "one")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    return path, n


def external_worker(path, who, how, out):
    """One fresh process: load (spa's lazy way or onnx.load with data), fold, report memory and result."""
    import onnx_graphsurgeon  # noqa
    import onnxruntime  # noqa

    sys.path.insert(0, str(ROOT))
    from onnx.external_data_helper import uses_external_data

    from spa.formats.load import load_model

    model = load_model(path) if how == "lazy" else onnx.load(path)
    before = _status("VmHWM")
    r = (_spa_fold if who == "spa" else _gs_fold)(model)
    peak = _status("VmHWM")
    ext = sum(uses_external_data(t) for t in r.graph.initializer)
    inline = sum(len(t.raw_data) for t in r.graph.initializer)
    Path(out).write_text(
        json.dumps(
            {
                "load_peak_mib": before / 2**20,
                "peak_mib": peak / 2**20,
                "ops": [n.op_type for n in r.graph.node],
                "external": ext,
                "inline_mib": inline / 2**20,
            }
        )
    )


def external(mib=256):
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _external_model(Path(tmp), mib)
        for how in ("lazy", "loaded"):
            for who in ("spa", "gs"):
                res = Path(tmp) / "r.json"
                done = subprocess.run(
                    [sys.executable, __file__, "--external-worker", str(path), who, how, str(res)],
                    check=False,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    out[f"{who} {how}"] = "failed: " + done.stderr.strip().splitlines()[-1][:150]
                    continue
                r = json.loads(res.read_text())
                warn = [line for line in done.stderr.splitlines() if "nference failed" in line or "rror" in line][:1]
                out[f"{who} {how}"] = (
                    f"peak {r['peak_mib']:.0f} MiB (after load {r['load_peak_mib']:.0f}), ops {r['ops']}, "
                    f"external tensors {r['external']}, inline {r['inline_mib']:.1f} MiB"
                    + (f"; {warn[0].strip()[:160]}" if warn else "")
                )
    return out


def run_checks() -> None:
    import numpy  # noqa: F401

    sys.path.insert(0, str(ROOT))
    for name, fn in (
        ("initializer that is also a graph input (an overridable default)", initializer_input),
        ("If with a constant condition; a weight read only inside the branches", subgraph_if),
        ("opset-dependent folding (Squeeze axes: attribute in opset 11, input in 13)", opsets),
        ("a 256 MiB external-data weight feeding a Transpose, plus a small foldable Reshape", external),
    ):
        print(f"## {name}")
        for key, value in fn().items():
            print(f"  {key}: {value}")


# ----------------------------------------------------------------------------- driver


def _run(job, who, path, save=None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    cmd = [sys.executable, __file__, "--worker", job, who, str(path), out] + ([save] if save else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        os.unlink(out)
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    record = json.loads(Path(out).read_text())
    os.unlink(out)
    warnings = [line for line in done.stderr.splitlines() if "Inference failed" in line or "W]" in line]
    record["warnings"] = warnings[:3]
    return record


def _ort_outputs(path: str, seed: int = 0):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        shape = [d if isinstance(d, int) else 4 for d in info.shape]  # free axes: 4
        if info.type == "tensor(int64)":  # token ids (small, inside any vocabulary) and masks
            feeds[info.name] = rng.integers(0, 2 if "mask" in info.name else 100, shape, dtype=np.int64)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(np.float32)
    return session.run(None, feeds)


def _exported_resnet() -> Path:
    if ZOO.exists():
        return ZOO
    import torch
    import torchvision

    path = Path(tempfile.mkdtemp()) / "resnet50.onnx"
    model = torchvision.models.resnet50().eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=True, input_names=["input0"])
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--resnet", default=None)
    parser.add_argument("--large", default=str(LARGE))
    parser.add_argument("--no-large", action="store_true")
    parser.add_argument("--build-large", action="store_true", help="build the large model if it is missing")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--models", default="resnet,llama,large", help="which of resnet, llama, large to run")
    parser.add_argument("--json", default=None, help="also write every run's record here")
    args = parser.parse_args(argv)
    try:
        import onnx_graphsurgeon  # noqa: F401
    except ImportError:
        print("onnx-graphsurgeon is not installed: pip install onnx-graphsurgeon", file=sys.stderr)
        return 2

    chosen = set(args.models.split(","))
    models = [("ResNet-50", Path(args.resnet) if args.resnet else _exported_resnet())] if "resnet" in chosen else []
    if FOLDABLE.exists() and "llama" in chosen:
        models.append(("tiny Llama, legacy export", FOLDABLE))
    if not args.no_large and "large" in chosen:
        large = Path(args.large)
        if not large.exists() and args.build_large:
            sys.path.insert(0, str(ROOT / "tools"))
            from bench_large import build

            build(large, 14)
        if large.exists():
            models.append(
                (
                    "decoder, %.1f GiB" % (sum(p.stat().st_size for p in large.parent.glob(large.name + "*")) / 2**30),
                    large,
                )
            )
        else:
            print(f"{large} missing: run tools/bench_large.py once or pass --build-large", file=sys.stderr)

    rows, everything = [], {}
    for label, path in models:
        for job in args.jobs.split(","):
            runs = {"spa": [], "gs": []}
            for _ in range(args.runs):
                for who in ("spa", "gs"):  # interleaved: A B A B ...
                    runs[who].append(_run(job, who, path))
            checks = {}
            small = path.stat().st_size < 2**30 and not list(path.parent.glob(path.name + ".data"))
            if small:
                import numpy as np

                with tempfile.TemporaryDirectory() as tmp:
                    outs = {}
                    for who in ("spa", "gs"):
                        saved = str(Path(tmp) / f"{who}.onnx")
                        record = _run(job, who, path, saved)
                        if "error" in record:
                            checks[f"ort_{who}"] = record["error"]
                        try:
                            outs[who] = _ort_outputs(saved) if "error" not in record else None
                        except Exception as exc:  # noqa: BLE001  (reported in the table)
                            outs[who] = None
                            checks[f"ort_{who}"] = str(exc).splitlines()[0][:120]
                    if outs["spa"] is not None and outs["gs"] is not None and len(outs["spa"]) == len(outs["gs"]):
                        checks["ort_max_diff"] = max(
                            float(np.max(np.abs(a - b))) for a, b in zip(outs["spa"], outs["gs"])
                        )
            everything[f"{label}/{job}"] = {"runs": runs, "checks": checks}
            rows.append((label, job, runs, checks))
            _print_row(label, job, runs, checks, header=len(rows) == 1)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


def _median(records, key):
    values = [r[key] for r in records if "error" not in r]
    return statistics.median(values) if values else None


def _print_row(label, job, runs, checks, header=False):
    if header:
        print(
            "| model | job | spa job s | gs job s | spa peak RSS | gs peak RSS "
            "| spa job +RSS | gs job +RSS | same result |"
        )
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
    cells = []
    for key in ("seconds",):
        for who in ("spa", "gs"):
            value = _median(runs[who], key)
            cells.append("failed" if value is None else f"{value:.3f}")
    for who in ("spa", "gs"):
        value = _median(runs[who], "peak")
        cells.append("failed" if value is None else f"{value / 2**20:.0f} MiB")
    for who in ("spa", "gs"):
        ok = [r for r in runs[who] if "error" not in r]
        grow = statistics.median([r["job_growth"] for r in ok]) if ok else None
        cells.append("-" if grow is None else f"{grow / 2**20:+.0f} MiB")
    print(f"| {label} | {job} | " + " | ".join(cells) + f" | {_same(runs, checks)} |", flush=True)
    for who in ("spa", "gs"):
        for record in runs[who]:
            if "error" in record:
                print(f"  {who} failed: {record['error']}", file=sys.stderr)
                break


def _same(runs, checks) -> str:
    a = next((r for r in runs["spa"] if "error" not in r), None)
    b = next((r for r in runs["gs"] if "error" not in r), None)
    if a is None or b is None:
        return "n/a"
    notes = []
    if a["nodes"] != b["nodes"]:
        notes.append(f"nodes {a['nodes']} vs {b['nodes']}")
    elif a["ops"] != b["ops"]:
        notes.append("op order differs")
    if a["init_names"] != b["init_names"]:
        notes.append(f"initializers {a['initializers']} vs {b['initializers']}")
    elif a["init_digest"] != b["init_digest"]:
        notes.append("initializer data/references differ")
    if a["external"] != b["external"]:
        notes.append(f"external tensors {a['external']} vs {b['external']}")
    if not b["sorted"]:
        notes.append("gs result not sorted")
    if not a["sorted"]:
        notes.append("spa result not sorted")
    for who in ("spa", "gs"):
        if f"ort_{who}" in checks:
            notes.append(f"ORT failed on {who}'s result: {checks[f'ort_{who}']}")
    if "ort_max_diff" in checks:
        diff = checks["ort_max_diff"]
        notes.append(
            "onnxruntime outputs identical" if diff == 0 else f"onnxruntime outputs differ by up to {diff:.1e}"
        )
    return "; ".join(notes) if notes else "yes (structure)"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--external-worker"]:
        external_worker(*sys.argv[2:6])
        sys.exit(0)
    if sys.argv[1:2] == ["--checks"]:
        run_checks()
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6], sys.argv[6] if len(sys.argv) > 6 else None)
        sys.exit(0)
    sys.exit(main())
