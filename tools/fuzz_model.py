"""Structured fuzzing: mutate the ModelProto itself and check spa only ever fails cleanly.

    python tools/fuzz_model.py [--seconds 600] [--seed 0] [--subprocess] [--findings DIR]

A byte fuzzer (tools/fuzz_bytes.py) mostly breaks the protobuf encoding, which spa refuses at
the first parse. This one edits what a parsed model says: element types, dims, attributes,
names, external-data entries and topology (nodes deleted, duplicated, reordered or rewired,
subgraphs added), starting from the repository's models and a few small built ones.

Each mutant is written into a fresh private folder and run through ``spa analyze`` and
``spa prune``, with TMPDIR pointing at a private, empty folder. A finding is: an exit status
other than 0, 2, 3, 4 or 5 (1 is an internal error, a bug), a traceback or "internal error" in
the output, a failure that says more than one line, a run past the per-case timeout, a file
left in TMPDIR or the model's folder that is not the expected output, or an input file changed.
Each finding is saved with its mutant and the command that reproduces it.

``--subprocess`` runs every case as ``python -m spa`` in its own process (what users run;
catches hangs in native code and deaths by signal). Without it, cases run in this process
through click's test runner, with a SIGALRM timeout: faster, for CI.
Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLEAN_EXITS = {0, 2, 3, 4, 5}
HUGE = [2**31, 2**32 + 1, 2**62, 2**63 - 1]
STRANGE = [-(2**63), -(2**31), -7, -1, 0, 1, 3, 1000003] + HUGE


# ---------------------------------------------------------------- seeds


def seed_models() -> list[tuple[str, onnx.ModelProto]]:
    seeds = [(p.stem, onnx.load(str(p))) for p in sorted((ROOT / "models").glob("*.onnx"))]
    return seeds + [(name, build()) for name, build in _BUILT.items()]


def _convs():
    from builder import Graph

    g = Graph(opset=17)
    x = g.input("x", ["n", 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 8)])
    d = g.op("Relu", [g.conv(h, 8, 8, group=8)])
    a, b = g.op("Split", [d, g.const(np.array([4, 4], np.int64))], n_out=2, axis=1)
    c = g.op("Concat", [g.conv(a, 4, 6), g.conv(b, 4, 6)], axis=1)
    r = g.op("Reshape", [g.op("GlobalAveragePool", [c]), g.const(np.array([0, -1], np.int64))])
    g.output(g.op("Gemm", [r, g.weight(5, 12), g.weight(5)], transB=1))
    return g.build()


def _mlp_with_if():
    from builder import Graph

    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 10)])])
    h = g.op("Add", [h, g.weight(10)])
    cond = g.const(np.array(True))
    then = helper.make_graph(
        [helper.make_node("Relu", [h], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", [h], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    branch = g.op("If", [cond], then_branch=then, else_branch=other)
    g.output(g.op("MatMul", [branch, g.weight(10, 3)]))
    return g.build()


def _quantized():
    from builder import Graph

    g = Graph(opset=21)
    x = g.input("x", [1, 3, 6, 6])
    values = np.random.default_rng(0).integers(0, 8, (8, 3, 3, 3))
    g.inits += [
        helper.make_tensor("wq", TensorProto.UINT4, values.shape, values.ravel().tolist()),
        numpy_helper.from_array(np.float32(0.05), "ws"),
    ]
    w = g.op("DequantizeLinear", ["wq", "ws"])
    h = g.op("Relu", [g.op("Conv", [x, w], pads=[1] * 4)])
    h = g.op("Relu", [g.conv(h, 8, 8)])
    g.output(g.conv(h, 8, 2))
    return g.build()


_BUILT = {"built_convs": _convs, "built_mlp_if": _mlp_with_if, "built_uint4": _quantized}


# ---------------------------------------------------------------- mutations


@dataclass
class Mutant:
    model: onnx.ModelProto
    what: list[str] = field(default_factory=list)
    external: dict | None = None  # tensor name -> (location, offset, length, data written)
    byte_edits: list[tuple[bytes, bytes]] = field(default_factory=list)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _names(graph: onnx.GraphProto) -> list[str]:
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    return names + [o for n in graph.node for o in n.output if o]


def _any_graph(m: Mutant, rng: random.Random) -> onnx.GraphProto:
    graphs = list(_graphs(m.model.graph))
    return graphs[0] if rng.random() < 0.8 else rng.choice(graphs)


def mut_data_type(m, rng):
    g = _any_graph(m, rng)
    if g.initializer:
        t = rng.choice(g.initializer)
        t.data_type = rng.choice(list(TensorProto.DataType.values()) + [29, 99, -1 & 0x7FFFFFFF])
        m.what.append(f"initializer {t.name} data_type {t.data_type}")


def mut_elem_type(m, rng):
    g = _any_graph(m, rng)
    infos = list(g.input) + list(g.output) + list(g.value_info)
    if infos:
        info = rng.choice(infos)
        info.type.tensor_type.elem_type = rng.choice(list(TensorProto.DataType.values()) + [77])
        m.what.append(f"value {info.name} elem_type {info.type.tensor_type.elem_type}")


def mut_dims(m, rng):
    g = _any_graph(m, rng)
    if rng.random() < 0.5 and g.initializer:
        t = rng.choice(g.initializer)
        if t.dims:
            k = rng.randrange(len(t.dims))
            t.dims[k] = rng.choice(STRANGE)
            m.what.append(f"initializer {t.name} dims {list(t.dims)}")
        return
    infos = list(g.input) + list(g.output)
    if infos:
        info = rng.choice(infos)
        dims = info.type.tensor_type.shape.dim
        if dims and rng.random() < 0.8:
            d = rng.choice(dims)
            if rng.random() < 0.7:
                d.dim_value = rng.choice(STRANGE)
            else:
                d.dim_param = rng.choice(["", "n", "x" * 300, "batch"])
        else:
            info.type.tensor_type.ClearField("shape")
        m.what.append(f"value {info.name} shape changed")


def mut_raw_data(m, rng):
    tensors = [t for t in m.model.graph.initializer if t.HasField("raw_data")]
    if tensors:
        t = rng.choice(tensors)
        cut = rng.choice([0, 1, len(t.raw_data) // 2, len(t.raw_data) - 1, len(t.raw_data) + 3])
        t.raw_data = (t.raw_data + b"\x7f" * 8)[:cut]
        m.what.append(f"initializer {t.name} raw_data {cut} bytes")


def mut_values(m, rng):
    """Constants that are shapes and sizes: Reshape targets, Split sizes, Slice bounds, axes."""
    small = [t for t in m.model.graph.initializer if t.data_type == TensorProto.INT64 and 0 < np.prod(t.dims) <= 8]
    if small:
        t = rng.choice(small)
        value = numpy_helper.to_array(t).copy().reshape(-1)
        value[rng.randrange(value.size)] = rng.choice(STRANGE)
        t.CopyFrom(numpy_helper.from_array(value.reshape(numpy_helper.to_array(t).shape), t.name))
        m.what.append(f"int64 constant {t.name} = {value.tolist()}")


def mut_attribute(m, rng):
    g = _any_graph(m, rng)
    nodes = [n for n in g.node if n.attribute] or list(g.node)
    if not nodes:
        return
    node = rng.choice(nodes)
    roll = rng.random()
    if node.attribute and roll < 0.5:
        attr = rng.choice(node.attribute)
        if attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice(STRANGE)
        elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
            attr.ints[rng.randrange(len(attr.ints))] = rng.choice(STRANGE)
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
        else:
            attr.type = rng.choice([1, 2, 3, 6, 7])
        m.what.append(f"node {node.name} attribute {attr.name} changed")
    elif node.attribute and roll < 0.7:
        del node.attribute[rng.randrange(len(node.attribute))]
        m.what.append(f"node {node.name} attribute deleted")
    else:
        name = rng.choice(["group", "axis", "perm", "kernel_shape", "pads", "strides", "transB", "epsilon"])
        value = rng.choice([rng.choice(STRANGE), [rng.choice(STRANGE)] * rng.randrange(1, 5), 0.5])
        node.attribute.append(helper.make_attribute(name, value))
        m.what.append(f"node {node.name} attribute {name}={value} added")


def mut_delete_node(m, rng):
    g = _any_graph(m, rng)
    if g.node:
        k = rng.randrange(len(g.node))
        m.what.append(f"node {g.node[k].name} deleted")
        del g.node[k]


def mut_duplicate_node(m, rng):
    g = _any_graph(m, rng)
    if g.node:
        node = onnx.NodeProto()
        node.CopyFrom(rng.choice(g.node))
        if rng.random() < 0.5:
            for i in range(len(node.output)):
                node.output[i] += "_dup"
        g.node.insert(rng.randrange(len(g.node) + 1), node)
        m.what.append(f"node {node.name} duplicated")


def mut_reorder(m, rng):
    g = _any_graph(m, rng)
    if len(g.node) > 1:
        i, j = rng.sample(range(len(g.node)), 2)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        m.what.append(f"nodes {i} and {j} swapped")


def mut_rewire(m, rng):
    g = _any_graph(m, rng)
    nodes = [n for n in g.node if n.input]
    if nodes:
        node = rng.choice(nodes)
        k = rng.randrange(len(node.input))
        node.input[k] = rng.choice(_names(m.model.graph) + ["", "nowhere"])
        m.what.append(f"node {node.name} input {k} -> {node.input[k]}")


def mut_op_type(m, rng):
    g = _any_graph(m, rng)
    if g.node:
        node = rng.choice(g.node)
        ops = [
            "Conv",
            "Gemm",
            "MatMul",
            "Add",
            "Relu",
            "Reshape",
            "Split",
            "Concat",
            "Transpose",
            "Slice",
            "Gather",
            "Loop",
            "Scan",
            "If",
            "BatchNormalization",
            "LayerNormalization",
            "Resize",
            "Expand",
            "Tile",
            "Pad",
            "Squeeze",
            "Unsqueeze",
            "Flatten",
            "Softmax",
            "NoSuchOp",
        ]
        node.op_type = rng.choice(ops)
        if rng.random() < 0.1:
            node.domain = rng.choice(["com.microsoft", "com.acme", "ai.onnx"])
        m.what.append(f"node {node.name} op_type -> {node.op_type}")


def mut_names(m, rng):
    g = m.model.graph
    roll = rng.random()
    names = _names(g)
    if not names:
        return
    old = rng.choice(names)
    new = rng.choice(["", "x" * 5000, old + "\u00e9", "a/b", "../x", rng.choice(names)])
    if roll < 0.3:
        # a name that is not valid UTF-8 can only be written as bytes
        m.byte_edits.append((old.encode(), old.encode()[:-1] + b"\xff"))
        m.what.append(f"name {old} made invalid UTF-8")
        return
    for graph in _graphs(g):
        for node in graph.node:
            for seq in (node.input, node.output):
                for i, name in enumerate(seq):
                    if name == old and rng.random() < 0.8:
                        seq[i] = new
        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            if info.name == old:
                info.name = new
        for t in graph.initializer:
            if t.name == old:
                t.name = new
    m.what.append(f"name {old[:40]} -> {new[:40]}")


def mut_opset(m, rng):
    roll = rng.random()
    if roll < 0.4 and m.model.opset_import:
        m.model.opset_import[0].version = rng.choice([0, 1, 6, 11, 13, 18, 21, 23, 99])
    elif roll < 0.6:
        m.model.ir_version = rng.choice([0, 2, 3, 7, 10, 11, 99])
    elif roll < 0.8:
        m.model.opset_import.append(helper.make_opsetid(rng.choice(["", "com.microsoft", "x"]), rng.choice([1, 99])))
    else:
        del m.model.opset_import[:]
    m.what.append("opset/ir version changed")


def mut_subgraph(m, rng):
    """Wrap a node in an If whose branches run it (or a broken copy of it)."""
    g = m.model.graph
    nodes = [n for n in g.node if len(n.output) == 1 and n.op_type not in ("If", "Loop", "Scan")]
    if not nodes:
        return
    node = rng.choice(nodes)
    k = list(g.node).index(node)
    out = node.output[0]
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    inner.output[0] = out + "_inner"
    inner.name = node.name + "_inner"
    body = helper.make_graph([inner], "branch", [], [helper.make_tensor_value_info(inner.output[0], 1, None)])
    other = onnx.GraphProto()
    other.CopyFrom(body)
    if rng.random() < 0.3:
        other.node[0].op_type = "Neg"
        del other.node[0].attribute[:]
        del other.node[0].input[1:]
    if rng.random() < 0.3 and g.initializer:  # a subgraph that keeps a weight of its own
        t = TensorProto()
        t.CopyFrom(rng.choice(g.initializer))
        t.name = t.name + "_sub"
        body.initializer.append(t)
    cond = g.initializer.add()
    cond.CopyFrom(numpy_helper.from_array(np.array(rng.random() < 0.5), out + "_cond"))
    wrapper = helper.make_node("If", [cond.name], [out], name=node.name + "_if", then_branch=body, else_branch=other)
    g.node[k].CopyFrom(wrapper)
    m.what.append(f"node {node.name} wrapped in If")


def mut_external(m, rng):
    """Move initializers to external data, then spoil the entries."""
    inits = [t for t in m.model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) > 16]
    if not inits:
        return
    m.external = m.external or {}
    for t in rng.sample(inits, min(len(inits), rng.randrange(1, 4))):
        data = t.raw_data
        offset = len(m.external) * 4096
        entries = {"location": "weights.bin", "offset": str(offset), "length": str(len(data))}
        roll = rng.random()
        if roll < 0.15:
            entries["offset"] = rng.choice(["abc", "-4", "1e3", "4.0", " 7", str(2**70), ""])
        elif roll < 0.3:
            entries["length"] = rng.choice(["x", "-1", str(len(data) + 1), str(len(data) - 1), "0"])
        elif roll < 0.45:
            entries["location"] = rng.choice(
                [
                    "/etc/passwd",
                    "../weights.bin",
                    "w\0.bin",
                    "x" * 5000,
                    "missing.bin",
                    "",
                    ".",
                    "sub/../weights.bin",
                    "weights.bin/",
                ]
            )
        elif roll < 0.5:
            del entries["location"]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in entries.items():
            e = t.external_data.add()
            e.key, e.value = key, value
        m.external[t.name] = (offset, data)
    m.what.append(f"external data for {len(m.external)} tensors")


MUTATIONS = [
    mut_data_type,
    mut_elem_type,
    mut_dims,
    mut_raw_data,
    mut_values,
    mut_attribute,
    mut_delete_node,
    mut_duplicate_node,
    mut_reorder,
    mut_rewire,
    mut_op_type,
    mut_names,
    mut_opset,
    mut_subgraph,
    mut_external,
]


def mutate(seed: onnx.ModelProto, rng: random.Random) -> Mutant:
    model = onnx.ModelProto()
    model.CopyFrom(seed)
    m = Mutant(model)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutation = rng.choice(MUTATIONS)
        try:
            mutation(m, rng)
        except Exception:  # an earlier edit left nothing this one can apply to (a constant cut short)
            m.what.append(f"{mutation.__name__} not applicable")
    return m


def write_mutant(m: Mutant, folder: Path) -> Path:
    data = m.model.SerializeToString()
    for old, new in m.byte_edits:
        data = data.replace(old, new)
    path = folder / "m.onnx"
    path.write_bytes(data)
    if m.external is not None:
        blob = bytearray()
        for offset, chunk in m.external.values():
            blob.extend(b"\0" * (offset - len(blob)))
            blob.extend(chunk)
        (folder / "weights.bin").write_bytes(bytes(blob))
    return path


# ---------------------------------------------------------------- running

OPTION_SETS = [
    ["--criterion", "l2", "--no-compensate"],
    ["--criterion", "l1", "--ratio", "0.5", "--soft"],
    ["--criterion", "l2", "--round-to", "2", "--no-validate"],
    ["--ratio", "0.3"],
]


@dataclass
class Outcome:
    command: list[str]
    code: int | None  # None: timed out
    output: str


_NOT_SPAS: set[str] = set()


class _Timeout(BaseException):
    """Raised by SIGALRM in the in-process mode (BaseException: spa's handlers must not catch it)."""


def _run_in_process(args: list[str], tmpdir: Path, timeout: float) -> Outcome:
    from click.testing import CliRunner

    from spa.cli.commands import main

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = CliRunner().invoke(main, args)
        code, output = result.exit_code, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            code, output = 1, output + f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
        # the runner keeps the exception, whose frames keep spa's objects (scratch folders) alive;
        # a process that exits drops them, so they are dropped here too before anything is judged
        del result
        gc.collect()
    except _Timeout:
        code, output = None, "timed out"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        tempfile.tempdir = saved
    return Outcome(["spa", *args], code, output)


def _files_onnxruntime_keeps() -> set[str]:
    """What importing onnxruntime itself leaves in TMPDIR (1.32 keeps a session id in ``.ses``):
    not spa's to clean up."""
    with tempfile.TemporaryDirectory() as probe:
        subprocess.run(
            [sys.executable, "-c", "import onnxruntime"],
            env={**os.environ, "TMPDIR": probe},
            capture_output=True,
            timeout=120,
        )
        return {p.name for p in Path(probe).iterdir()}


def _run_subprocess(args: list[str], tmpdir: Path, timeout: float) -> Outcome:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "spa", *args]
    try:
        # the limit is inherited from this process (see _memory_limit)
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT), errors="replace"
        )
        return Outcome(command, done.returncode, done.stdout + done.stderr)
    except subprocess.TimeoutExpired:
        return Outcome(command, None, "timed out")


@contextlib.contextmanager
def _memory_limit(gib: float | None):
    """Cap the address space, so that a mutant asking for more memory than the machine has (an input
    declared 1000003 pixels high, run for validation) fails to allocate instead of waking the
    kernel's OOM killer, which takes down the fuzzer and whatever else runs beside it."""
    if not gib:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + int(gib * 2**30)  # on top of what is mapped already (libraries, arenas)
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _problems(outcome: Outcome, folder: Path, tmpdir: Path, before: dict[str, str], expected: set[str]) -> list[str]:
    problems = []
    if outcome.code is None:
        problems.append("hang (timeout)")
    elif outcome.code not in CLEAN_EXITS:
        problems.append(f"exit {outcome.code}")
    if "Traceback" in outcome.output or "internal error" in outcome.output:
        problems.append("traceback / internal error")
    if outcome.code not in (0, None):
        errors = [line for line in outcome.output.splitlines() if line.startswith("spa: error:")]
        if outcome.code != 2 and (len(errors) != 1 or len(outcome.output.strip().splitlines()) != 1):
            problems.append("failure not one line")
    after = _digests(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    if changed:
        problems.append(f"input changed: {changed}")
    extra = sorted(set(after) - set(before) - expected) + sorted(p.name for p in folder.iterdir() if p.is_dir())
    if extra:
        problems.append(f"left in the model's folder: {extra}")
    left = sorted(p.name for p in tmpdir.iterdir() if p.name not in _NOT_SPAS)
    if left:
        problems.append(f"left in TMPDIR: {left}")
    return problems


def run_case(m: Mutant, work: Path, timeout: float, options: list[str], in_process: bool):
    """Returns (outcomes, problems). The folder and TMPDIR are emptied afterwards."""
    folder, tmpdir = work / "case", work / "tmp"
    for path in (folder, tmpdir):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
    model = write_mutant(m, folder)
    runner = _run_in_process if in_process else _run_subprocess
    outcomes, problems = [], []
    for args, expected in (
        (["analyze", str(model)], set()),
        (
            ["prune", str(model), "--no-bench", *options],
            {"m.pruned.onnx", "m.pruned.onnx.data", "m.soft.onnx", "m.soft.onnx.data"},
        ),
    ):
        before = _digests(folder)
        outcome = runner(args, tmpdir, timeout)
        outcomes.append(outcome)
        problems += [f"{args[0]}: {p}" for p in _problems(outcome, folder, tmpdir, before, expected)]
        if outcome.code is None:
            break
    return outcomes, problems


def save_finding(findings: Path, index: int, m: Mutant, outcomes: list[Outcome], problems: list[str]) -> Path:
    where = findings / f"case{index:05d}"
    where.mkdir(parents=True, exist_ok=True)
    write_mutant(m, where)
    (where / "finding.json").write_text(
        json.dumps(
            {
                "problems": problems,
                "mutations": m.what,
                "reproduce": [
                    " ".join(
                        ["python -m spa"]
                        + [
                            "m.onnx" if a.endswith("m.onnx") else a
                            for a in o.command[o.command.index("-m") + 2 if "-m" in o.command else 1 :]
                        ]
                    )
                    for o in outcomes
                ],
                "outputs": [{"exit": o.code, "output": o.output[-4000:]} for o in outcomes],
            },
            indent=2,
        )
    )
    return where


def fuzz(
    seconds: float,
    seed: int,
    max_cases: int | None = None,
    timeout: float = 60,
    in_process: bool = True,
    findings: Path | None = None,
    verbose: bool = False,
    skip: int = 0,
    memory_gib: float | None = 8,
) -> tuple[int, list[tuple[list[str], Path | None]], dict]:
    """Mutate and run until the time or case budget is spent. Returns (cases, findings, exit counts)."""
    rng = random.Random(seed)
    seeds = seed_models()
    _NOT_SPAS.update(_files_onnxruntime_keeps())
    found: list[tuple[list[str], Path | None]] = []
    seen: set[str] = set()
    exits: dict = {}
    cases = 0
    deadline = time.monotonic() + seconds
    with (
        tempfile.TemporaryDirectory(prefix="spa-fuzz-") as scratch,
        warnings.catch_warnings(),
        _memory_limit(memory_gib),
    ):
        warnings.simplefilter("ignore")
        work = Path(scratch)
        while time.monotonic() < deadline and (max_cases is None or cases < max_cases):
            name, model = rng.choice(seeds)
            m = mutate(model, rng)
            options = rng.choice(OPTION_SETS)
            if cases < skip:  # the same mutants as a full run, to reach one case again
                cases += 1
                continue
            outcomes, problems = run_case(
                m, work, min(timeout, max(deadline - time.monotonic(), 5) + 30), options, in_process
            )
            cases += 1
            for o in outcomes:
                exits[o.code] = exits.get(o.code, 0) + 1
            if verbose:
                print(cases, name, m.what, [o.code for o in outcomes], flush=True)
            if problems:
                key = (
                    problems[0]
                    + " | "
                    + next((line for line in outcomes[-1].output.splitlines() if "error" in line), "")[:120]
                )
                saved = save_finding(findings, cases, m, outcomes, problems) if findings else None
                if key not in seen:
                    seen.add(key)
                    found.append(
                        (
                            [f"seed model {name}: {', '.join(m.what)}"]
                            + problems
                            + [outcomes[-1].output.strip()[-600:]],
                            saved,
                        )
                    )
    return cases, found, exits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cases", type=int)
    parser.add_argument("--timeout", type=float, default=60, help="per command, in seconds")
    parser.add_argument("--subprocess", action="store_true", help="run each case as its own process")
    parser.add_argument("--findings", default="fuzz-findings", help="folder for reproducers")
    parser.add_argument("--memory-gib", type=float, default=8, help="address space a case may add, in GiB (0: no cap)")
    parser.add_argument("--skip", type=int, default=0, help="generate but do not run the first N cases")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(FileExistsError):
        Path(args.findings).mkdir(parents=True)
    cases, found, exits = fuzz(
        args.seconds,
        args.seed,
        args.max_cases,
        args.timeout,
        not args.subprocess,
        Path(args.findings),
        args.verbose,
        args.skip,
        args.memory_gib,
    )
    for lines, saved in found:
        print("FINDING " + "\n    ".join(lines) + (f"\n    reproducer: {saved}" if saved else ""))
    print(f"{cases} cases, exit statuses {dict(sorted(exits.items(), key=str))}, {len(found)} distinct findings")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
