"""Every zoo model, from both exporters, prunes into a valid and exact model.

``spa.prune`` with ``check=True`` raises if the checker, onnxruntime, the I/O
comparison or soft == hard fails; the assertions below restate what matters.
"""

import onnx
import pytest
import zoo

import spa

CASES = [(name, exporter) for name in zoo.ALL for exporter in zoo.EXPORTERS]


@pytest.mark.zoo
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{e}-{n}" for n, e in CASES])
def test_prune_zoo_model(zoo_model, name, exporter):
    path = zoo_model(name, exporter)
    # exact counts, so that every prunable group is cut whatever this machine's kernels prefer
    result = spa.prune(path, ratio=0.4, criterion="l2", round_to=1)
    report, validation = result.report, result.report.validation
    assert validation.checker == "ok"
    assert validation.runs and validation.io_match
    assert report.groups_prunable > 0, "every zoo model has something prunable"
    assert report.groups_pruned == report.groups_prunable
    # hard == soft on the exact groups, the property that catches wrong offsets and permutations
    assert validation.soft_equal is True
    assert validation.soft_max_rel_error < 1e-4
    assert report.params_after <= 0.70 * report.params_before, (
        f"params only fell from {report.params_before} to {report.params_after}"
    )
    assert report.flops_after < report.flops_before
    dense = onnx.load(str(path))
    assert [o.name for o in result.model.graph.output] == [o.name for o in dense.graph.output]


OBSPA_CASES = [
    ("resnet18", "legacy"),
    ("mobilenet_v3_small", "dynamo"),
    ("efficientnet_b0", "legacy"),
    ("densenet121", "dynamo"),
    ("shufflenet_v2_x1_0", "legacy"),
    ("flatten_gemm", "dynamo"),
    ("grouped_conv", "legacy"),
    ("c2f", "dynamo"),
    ("alexnet", "legacy"),
]


@pytest.mark.zoo
@pytest.mark.parametrize("name,exporter", OBSPA_CASES, ids=[f"{e}-{n}" for n, e in OBSPA_CASES])
def test_obspa_with_compensation_keeps_soft_equal_to_hard(zoo_model, name, exporter):
    """The default path: synthetic statistics, greedy OBS, refitted weights. The soft model zeroes
    the channels of the refitted weights, so it must still equal the cut one."""
    result = spa.prune(zoo_model(name, exporter), ratio=0.4)
    report = result.report
    assert report.options["criterion"] == "obspa" and report.statistics["source"] == "synthetic"
    assert report.compensation["layers"] > 0
    assert report.compensation["mean_output_error"] <= report.compensation["uncompensated_error"]
    assert report.validation.soft_equal is True and report.validation.io_match


@pytest.mark.zoo
@pytest.mark.parametrize(
    "name,exporter",
    [("resnet18", "legacy"), ("shufflenet_v2_x1_0", "dynamo"), ("densenet121", "legacy"), ("c2f", "legacy")],
)
def test_ratio_zero_is_exact(zoo_model, name, exporter):
    result = spa.prune(zoo_model(name, exporter), ratio=0.0)
    assert result.report.groups_pruned == 0
    assert result.report.validation.dense_equal is True
    assert result.report.params_after == result.report.params_before
