"""The hidden (embedding) dimension of exported transformers: one approximate group.

Embedding tables, LayerNorm/RMSNorm weights (as ops or written out), every residual add, the
input rows of every Q/K/V and FFN projection, the output columns of every output projection and
the lm head (tied to the embedding table or not) shrink together. Norms mix the channels, so the
group is approximate: frozen unless ``approximate=True``, and frozen anyway where the hidden state
is a graph output.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import group_at, initializer
from conftest import zoo, zoo_dir

import spa
from spa.core.coupling import Dim

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hidden_model():
    return lambda name, exporter: zoo.export_hidden(name, exporter, zoo_dir())


def hidden_group(analysis, table: str):
    return group_at(analysis, table, 1)


def initializers(model) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def run(model, seed=0, batch=2, seq=7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), np.int64),
    }
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def check_pruned(path: Path, table: str, hidden: int = 64):
    dense = onnx.load(str(path))
    frozen = spa.analyze(str(path))
    assert "approximate group" in hidden_group(frozen.analysis, table).frozen  # off by default
    result = spa.prune(str(path), ratio=0.3, approximate=True)
    validation = result.report.validation
    assert validation.ok and validation.io_match, validation.problems
    assert validation.approximate_groups == 1  # the hidden group, left out of soft == hard
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in dense.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in dense.graph.output]
    kept = initializer(result.model, table).shape[1]
    assert kept < hidden
    assert run(result.model).shape == run(dense).shape
    return result, kept


def weights_2d(graph, op="MatMul") -> list[str]:
    return [
        n.inputs[1]
        for n in graph.nodes
        if n.op_type == op and graph.is_initializer(n.inputs[1]) and len(graph.shape(n.inputs[1])) == 2
    ]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_classifier_hidden_group(hidden_model, exporter):
    path = hidden_model("bert_classifier", exporter)
    analysis = spa.analyze(str(path), approximate=True).analysis
    graph = analysis.graph  # as spa loaded it: the exporter's shared LayerNorm weights unshared
    tables = [n.inputs[0] for n in graph.nodes if n.op_type == "Gather" and graph.is_initializer(n.inputs[0])]
    assert len(tables) == 3  # word, position, token type
    group = hidden_group(analysis, tables[0])
    dims = set(group.dims)
    assert all(Dim(t, 1) in dims for t in tables)
    assert not group.exact and "LayerNormalization" in group.inexact_reason and group.prunable
    norms = [n for n in graph.nodes if n.op_type == "LayerNormalization"]
    assert len(norms) == 5
    assert all({Dim(n.inputs[1], 0), Dim(n.inputs[2], 0), Dim(n.outputs[0], 2)} <= dims for n in norms)
    residuals = [graph.producer[n.inputs[0]] for n in norms]
    assert all(r.op_type == "Add" and Dim(r.outputs[0], 2) in dims for r in residuals)  # embeddings sum, 4 skips
    # Q, K, V and FFN-in read the hidden axis (weight rows), the output projections write it (columns)
    matmuls = weights_2d(graph)
    assert len(matmuls) == 12
    assert sum(Dim(w, 0) in dims for w in matmuls) == 8 and sum(Dim(w, 1) in dims for w in matmuls) == 4
    pooler = weights_2d(graph, "Gemm")[0]
    assert Dim(pooler, 1) in dims  # the pooler reads the first token's hidden state
    result, kept = check_pruned(path, tables[0])
    for t in tables:
        assert initializer(result.model, t).shape[1] == kept


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("tied", [True, False])
def test_llama_hidden_group_with_rmsnorm_written_out(hidden_model, exporter, tied):
    path = hidden_model("llama_tied" if tied else "llama_untied", exporter)
    analysis = spa.analyze(str(path), approximate=True).analysis
    graph = analysis.graph
    table = next(n.inputs[0] for n in graph.nodes if n.op_type == "Gather" and n.inputs[1] == "input_ids")
    group = hidden_group(analysis, table)
    dims = set(group.dims)
    assert not group.exact and group.prunable
    assert "RMSNorm written out" in group.inexact_reason and "and 2 more" in group.inexact_reason  # 5 norms
    head = next(n for n in graph.nodes if n.op_type == "MatMul" and n.outputs[0] == "logits")
    assert Dim(head.inputs[1], 0) in dims  # the lm head reads the hidden axis
    producer = graph.producer.get(head.inputs[1])
    if tied and exporter == "legacy":  # exported without folding: the head is the table, transposed
        assert producer.op_type == "Transpose" and producer.inputs[0] == table
        assert "graph output" in group_at(analysis, table, 0).frozen  # the vocabulary stays: logits
    else:  # folded into the head's own [hidden, vocab] copy
        assert producer is None and graph.shape(head.inputs[1]) == (64, 100)
    norm_weights = [
        t
        for n in graph.nodes
        if n.op_type == "Mul"
        for t in n.inputs
        if graph.is_initializer(t) and graph.shape(t) == (64,)
    ]
    assert len(norm_weights) == 5 and all(Dim(t, 0) in dims for t in norm_weights)
    check_pruned(path, table)


def test_tied_llama_shares_one_table(hidden_model):
    path = hidden_model("llama_tied", "legacy")
    model = onnx.load(str(path))
    table = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    readers = [n.op_type for n in model.graph.node if table in n.input]
    assert sorted(readers) == ["Gather", "Transpose"]
    result, kept = check_pruned(path, table)
    assert initializer(result.model, table).shape == (100, kept)


def test_bert_whose_output_is_the_hidden_state_keeps_it(tmp_path):
    path = zoo.export_attention("tiny_bert", "legacy", zoo_dir())
    analysis = spa.analyze(str(path), approximate=True).analysis
    group = hidden_group(analysis, "bert.embeddings.word_embeddings.weight")
    assert not group.exact and "last_hidden_state[2]: graph output" in group.frozen


def test_ppocr_rec_layer_norms_written_out():
    path = Path.home() / ".cache" / "spa" / "accuracy" / "ch_PP-OCRv4_rec_infer.onnx"
    if not path.exists():  # never downloads
        pytest.skip("PP-OCRv4 rec not cached; `python tools/eval_accuracy.py` fetches it")
    report = spa.analyze(str(path))
    group = next(g for g in report.groups if g.approximate and "LayerNorm written out" in g.approximate)
    assert group.channels == 120 and "approximate group" in group.frozen
    assert group.approximate.count("written out") == 3 and "and 2 more" in group.approximate  # 5 norms


def test_cli_names_the_norms_and_counts_the_approximate_group(hidden_model, tmp_path):
    import json

    from click.testing import CliRunner

    from spa.cli.commands import main

    path = hidden_model("llama_untied", "dynamo")
    out = CliRunner().invoke(main, ["analyze", str(path), "--approximate", "--json", str(tmp_path / "a.json")])
    assert out.exit_code == 0, out.output
    assert "approximate: normalised or averaged over these channels by RMSNorm written out" in out.output
    groups = json.loads((tmp_path / "a.json").read_text())["groups"]
    hidden = [g for g in groups if g["approximate"] and g["frozen"] is None]
    assert len(hidden) == 1 and hidden[0]["channels"] == 64 and "RMSNorm written out" in hidden[0]["approximate"]
    out = CliRunner().invoke(
        main, ["prune", str(path), "--approximate", "--ratio", "0.3", "--no-bench", "-o", str(tmp_path / "p.onnx")]
    )
    assert out.exit_code == 0, out.output
    assert "on exact groups; 1 approximate not compared" in out.output
