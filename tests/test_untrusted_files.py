"""The input's own files, special files, signals and files that change under spa.

spa never writes where the input model reads (its .onnx, every external data file of the main
graph and of subgraphs), never replaces anything but a regular file, leaves nothing behind when
stopped by SIGINT, SIGTERM or SIGHUP, and turns a file truncated under it into exit 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.cli.commands import main
from spa.core.tensors import to_array
from spa.formats.load import load_model

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert result.output.startswith("spa: error:") and result.output.count("\n") == 1, result.output


def conv_model(channels: int = 8, layers: int = 2) -> onnx.ModelProto:
    g = Graph()
    h = g.input("x", [1, 3, 8, 8])
    width = 3
    for _ in range(layers):
        h = g.op("Relu", [g.conv(h, width, channels)])
        width = channels
    g.output(g.conv(h, channels, 2))
    return g.build()


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )


def set_locations(path: Path, location: str, where=lambda tensor: True) -> None:
    """Point the external data entries of the tensors ``where`` picks (main graph and subgraphs) at ``location``."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _every_tensor(model.graph):
        if where(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    onnx.save(model, str(path))


def _every_tensor(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _every_tensor(attr.g)
            for sub in attr.graphs:
                yield from _every_tensor(sub)


def if_model() -> onnx.ModelProto:
    """A free conv -> relu -> conv path, and an If whose branches each keep a weight of their own."""
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    cond = g.input("cond", [], TensorProto.BOOL)
    free = g.conv(g.op("Relu", [g.conv(x, 3, 12)]), 12, 4, k=1)
    r = g.op("Relu", [g.conv(x, 3, 4)])
    branches = {}
    for name, op in (("then", "Mul"), ("else", "Add")):
        weight = numpy_helper.from_array(
            np.linspace(0.5, 1.5, 4 * 64, dtype=np.float32).reshape(1, 4, 8, 8), f"{name}_w"
        )
        branches[f"{name}_branch"] = helper.make_graph(
            [helper.make_node(op, [r, f"{name}_w"], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [weight],
        )
    y = g.op("If", [cond], name="if", **branches)
    g.output(g.op("Add", [y, free]))
    return g.build()


def in_branches(tensor) -> bool:
    return tensor.name in ("then_w", "else_w")


def external_locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in _every_tensor(model.graph) for e in t.external_data if e.key == "location"}


# --- the input's own files are never written ---------------------------------------------------


def test_default_output_never_takes_the_input_data_file_name(tmp_path):
    # the input keeps its weights in exactly the file spa would name the output's weights
    path = tmp_path / "m.onnx"
    save_external(conv_model(), path, "m.pruned.onnx.data")
    before = digest(tmp_path / "m.pruned.onnx.data")
    result = run("prune", path, "--no-bench")
    assert result.exit_code == 0, result.output
    assert "weights in" in result.output and "m.pruned.onnx.1.data" in result.output
    assert digest(tmp_path / "m.pruned.onnx.data") == before
    out = onnx.load(str(tmp_path / "m.pruned.onnx"), load_external_data=False)
    assert external_locations(out) == {"m.pruned.onnx.1.data"}
    onnx.checker.check_model(str(tmp_path / "m.pruned.onnx"), full_check=True)
    assert load_model(path).graph.initializer  # the input still loads: its data is intact


def test_output_onto_an_input_data_file_is_refused_even_with_force(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_model(), path, "w.bin")
    before = digest(tmp_path / "w.bin")
    (tmp_path / "alias.onnx").symlink_to(tmp_path / "w.bin")
    for target in ("w.bin", "alias.onnx", "./sub/../w.bin"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        result = run("prune", path, "-o", tmp_path / target, "--force", "--no-bench")
        one_line_error(result, 5)
        assert "w.bin" in result.output
    assert digest(tmp_path / "w.bin") == before and (tmp_path / "alias.onnx").is_symlink()


def test_a_subgraph_data_file_is_protected_too(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(if_model(), path, "m.data")
    set_locations(path, "branches.bin", in_branches)
    (tmp_path / "branches.bin").write_bytes((tmp_path / "m.data").read_bytes())
    before = digest(tmp_path / "branches.bin")
    one_line_error(run("prune", path, "-o", tmp_path / "branches.bin", "--force", "--no-bench"), 5)
    one_line_error(run("prune", path, "--json", tmp_path / "branches.bin", "--force", "--no-bench"), 5)
    assert digest(tmp_path / "branches.bin") == before


def test_json_follows_the_output_rules(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_model(), path, "m.data")
    data_before = digest(tmp_path / "m.data")
    report = tmp_path / "r.json"
    report.write_text("keep me")
    one_line_error(run("prune", path, "--json", report, "--no-bench"), 5)  # exists: needs --force
    assert report.read_text() == "keep me" and not (tmp_path / "m.pruned.onnx").exists()
    one_line_error(run("prune", path, "--json", tmp_path / "m.data", "--force", "--no-bench"), 5)
    one_line_error(run("prune", path, "--json", path, "--force", "--no-bench"), 5)
    # nor the output's own weights file, written moments before
    one_line_error(run("prune", path, "--json", tmp_path / "m.pruned.onnx.data", "--no-bench"), 5)
    assert digest(tmp_path / "m.data") == data_before
    assert run("prune", path, "--json", report, "--force", "--no-bench", "-q").exit_code == 0
    assert json.loads(report.read_text())["output"].endswith("m.pruned.onnx")
    # a previous output and its weights are replaced with --force, and only with it
    one_line_error(run("prune", path, "--no-bench"), 5)
    assert run("prune", path, "--force", "--no-bench", "-q").exit_code == 0
    assert digest(tmp_path / "m.data") == data_before


def test_json_to_standard_output(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(path))
    result = subprocess.run(
        [sys.executable, "-m", "spa", "prune", str(path), "--json", "-", "--no-bench"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["groups_pruned"] > 0  # only the JSON: the summary went to stderr
    assert "wrote" in result.stderr and not (tmp_path / "-").exists()


# --- nothing but regular files is ever replaced ------------------------------------------------


def _special_files(tmp_path: Path) -> dict[str, Path]:
    made = {"FIFO": tmp_path / "fifo", "directory": tmp_path / "folder", "socket": tmp_path / "sock"}
    os.mkfifo(made["FIFO"])
    made["directory"].mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["socket"]))
    server.close()
    if os.geteuid() == 0:  # a /dev/null of our own: replacing the real one would break the machine
        made["device"] = tmp_path / "null"
        os.mknod(made["device"], stat.S_IFCHR | 0o666, os.makedev(1, 3))
    made["link to FIFO"] = tmp_path / "link.onnx"
    made["link to FIFO"].symlink_to(made["FIFO"])
    return made


def _kinds(paths: dict[str, Path]) -> dict[str, int]:
    return {name: stat.S_IFMT(os.lstat(p).st_mode) for name, p in paths.items()}


def test_special_files_are_never_replaced(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(model))
    dense_copy = tmp_path / "d.onnx"
    onnx.save(conv_model(), str(dense_copy))
    special = _special_files(tmp_path)
    kinds = _kinds(special)
    for name, target in special.items():
        for args in (
            ["prune", model, "-o", target, "--force", "--no-bench"],
            ["prune", model, "--json", target, "--force", "--no-bench"],
            ["analyze", model, "--json", target],
            ["bench", model, "--runs", "1", "--warmup", "0", "--json", target],
            ["report", dense_copy, model, "--no-bench", "-o", target, "--force"],
        ):
            result = run(*args)
            one_line_error(result, 2)
            assert "regular file" in result.output or "directory" in result.output, (name, result.output)
    assert _kinds(special) == kinds
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "pruned" in p.name]


# --- subgraphs follow the main graph's external data rules -------------------------------------


@pytest.mark.parametrize("no_validate", [False, True])
@pytest.mark.parametrize("location", ["../secret.bin", "ABSOLUTE", "missing.bin", "fifo.bin"])
def test_subgraph_external_data_follows_the_folder_rule(tmp_path, location, no_validate):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    save_external(if_model(), path, "m.data")
    secret = tmp_path / "secret.bin"
    secret.write_bytes((folder / "m.data").read_bytes())
    os.mkfifo(folder / "fifo.bin")
    set_locations(path, str(secret) if location == "ABSOLUTE" else location, in_branches)
    result = run("prune", path, "--no-bench", *(["--no-validate"] if no_validate else []))
    one_line_error(result, 3)
    assert (
        "outside the model's folder" in result.output
        if location in ("../secret.bin", "ABSOLUTE")
        else "not found" in result.output
        if location == "missing.bin"
        else "not a regular file" in result.output
    )
    assert not [p.name for p in folder.iterdir() if "pruned" in p.name or p.name.startswith(".")]


def test_subgraph_external_data_out_of_range_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(if_model(), path, "m.data")
    model = onnx.load(str(path), load_external_data=False)
    then_w = next(t for t in _every_tensor(model.graph) if t.name == "then_w")
    for entry in then_w.external_data:
        if entry.key == "offset":
            entry.value = str((tmp_path / "m.data").stat().st_size)
    onnx.save(model, str(path))
    one_line_error(run("prune", path, "--no-bench", "--no-validate"), 3)


@pytest.mark.parametrize("no_validate", [False, True])
def test_a_model_with_subgraph_external_data_is_written_self_contained(tmp_path, no_validate):
    path = tmp_path / "m.onnx"
    save_external(if_model(), path, "m.data")
    set_locations(path, "branches.bin", in_branches)
    (tmp_path / "branches.bin").write_bytes((tmp_path / "m.data").read_bytes())
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    result = run(
        "prune", path, "-o", out, "--no-bench", "--criterion", "l2", *(["--no-validate"] if no_validate else [])
    )
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out), load_external_data=False)
    assert external_locations(written) <= {"p.onnx.data"}  # no absolute path, nothing of the input's
    assert sorted(p.name for p in out.parent.iterdir()) == sorted({"p.onnx"} | external_locations(written))
    onnx.checker.check_model(str(out), full_check=True)


def test_writing_a_model_that_points_elsewhere_is_refused(tmp_path):
    # an API caller's model whose subgraph still refers to a system file
    model = if_model()
    branch = next(a.g for n in model.graph.node for a in n.attribute if a.name == "then_branch")
    weight = branch.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    with pytest.raises(spa.OutputError, match="points at other files"):
        spa.formats.files.save_model(model, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


# --- files that change under spa ---------------------------------------------------------------


def test_data_truncated_or_replaced_after_loading_is_a_load_error(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_model(channels=64), path, "m.data")
    model = load_model(path)
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    assert to_array(big).shape == tuple(big.dims)
    data = (tmp_path / "m.data").read_bytes()
    with open(tmp_path / "m.data", "r+b") as handle:
        handle.truncate(len(data) // 2)
    with pytest.raises(spa.ModelLoadError, match="changed while spa was reading it"):
        to_array(big)
    (tmp_path / "m.data").write_bytes(bytes(len(data)))  # same size, other content
    with pytest.raises(spa.ModelLoadError, match="changed while spa was reading it"):
        to_array(big)


# Truncates the input's data file the first time spa reads a large weight, after that read: what a
# concurrent writer does at the worst moment, made deterministic.
TRUNCATING_DRIVER = """
import sys
import spa.core.tensors, spa.transforms.cut, spa.core.graph
original = spa.core.tensors.to_array
done = []
def to_array(tensor):
    value = original(tensor)
    if not done and value.nbytes > 4096 and tensor.external_data:
        done.append(1)
        location = next(e.value for e in tensor.external_data if e.key == "location")
        with open(location, "r+b") as handle:
            handle.truncate(4096)
    return value
for module in (spa.core.tensors, spa.transforms.cut, spa.core.graph):
    module.to_array = to_array
from spa.cli.commands import main
sys.exit(main())
"""


def test_input_truncated_mid_run_exits_3_not_by_signal(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(conv_model(channels=64), path, "m.data")
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATING_DRIVER, "prune", str(path), "--no-bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
        check=False,
    )
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stderr.startswith("spa: error:") and result.stderr.count("\n") == 1, result.stderr
    assert "changed while spa was reading it" in result.stderr
    assert not [p.name for p in tmp_path.iterdir() if "pruned" in p.name or p.name.startswith(".")]


# --- signals -----------------------------------------------------------------------------------


# onnxruntime's bundled telemetry library writes a session id file into $TMPDIR when it is
# imported, kept from run to run: not spa's scratch space
ONNXRUNTIME_OWN = {".ses"}


def _env(tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}


def _wide_model(path: Path) -> None:
    """About 30 MB of weights in external data: the cut, validation and write take seconds, and a
    scratch folder holds a copy of the weights meanwhile."""
    g = Graph()
    h = g.input("x", [1, 384, 16, 16])
    for _ in range(6):
        h = g.op("Relu", [g.conv(h, 384, 384)])
    g.output(h)
    save_external(g.build(), path, "wide.data")


def _default_signal_handling() -> None:
    """spa keeps a signal ignored that was ignored when it started (nohup), and a shell starts
    background jobs with SIGINT ignored: the child under test starts with default handling."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _wait_for(predicate, process, limit=240.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < limit and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _early_staging(out: Path) -> bool:
    for folder in out.glob(".*"):
        try:
            return sum(f.stat().st_size for f in folder.iterdir()) < 8 << 20
        except OSError:  # gone between listing and reading: too late
            return False
    return False


@pytest.mark.parametrize("moment", ["scratch", "staging"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_leave_nothing_behind(tmp_path, signum, moment):
    path = tmp_path / "wide.onnx"
    _wide_model(path)
    out = tmp_path / "out"
    out.mkdir()
    env = _env(tmp_path)
    scratch = Path(env["TMPDIR"])
    process = subprocess.Popen(
        [sys.executable, "-m", "spa", "prune", str(path), "-o", str(out / "p.onnx"), "--no-bench", "--criterion", "l2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signal_handling,
    )
    try:
        if moment == "scratch":  # the cut copied the weights into $TMPDIR/spa-*; validation is running
            seen = _wait_for(lambda: any(p.name.startswith("spa-") for p in scratch.iterdir()), process)
        else:  # the output is being streamed into a staging folder beside it, not yet half written
            seen = _wait_for(lambda: _early_staging(out), process)
        if not seen:
            pytest.skip(f"the run ended before the {moment} stage could be caught")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert list(out.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if p.name not in ONNXRUNTIME_OWN] == []


@pytest.mark.parametrize(
    "entry, value, message",
    [
        ("location", "w\0.bin", "contains a NUL byte"),
        ("location", "w" * 5000, "too long to be a file name"),
        ("location", "", "names none"),
        ("offset", "1.5", "not a whole number"),
        ("length", "many", "not a whole number"),
        ("offset", "-4096", "'-4096' is not a whole number of bytes"),
    ],
    ids=["NUL byte", "5000 characters", "empty location", "fractional offset", "word length", "negative offset"],
)
@pytest.mark.parametrize("where", ["main graph", "subgraph"])
def test_malformed_external_data_entries_are_load_errors(tmp_path, entry, value, message, where):
    path = tmp_path / "m.onnx"
    save_external(if_model(), path, "m.data")
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(
        t for t in _every_tensor(model.graph) if t.external_data and (t.name == "then_w") == (where == "subgraph")
    )
    for item in tensor.external_data:
        if item.key == entry:
            item.value = value
    if entry not in {e.key for e in tensor.external_data}:
        item = tensor.external_data.add()
        item.key, item.value = entry, value
    onnx.save(model, str(path))
    result = run("prune", path, "--no-bench", "--no-validate")
    one_line_error(result, 3)
    assert message in result.output
