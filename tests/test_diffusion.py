"""Tiny random-weight diffusers models (tools/zoo_diffusion.py), exported with both torch exporters.

GroupNorm is everywhere in them, written out as Reshape -> InstanceNormalization -> Reshape; the
ResNet blocks add a time-embedding projection per channel, the transformer blocks attend to
themselves and (UNet2DConditionModel) to a text context, and the decoder concatenates encoder
skips. Each prunes with whole GroupNorm groups and whole heads, exactly.
"""

import onnx
import pytest

import spa

MODELS = ("unet2d", "unet2d_condition", "vae_decoder")
HEADED_LAYERS = {"unet2d": 4, "unet2d_condition": 8, "vae_decoder": 0}  # self- and cross-attention


@pytest.fixture(scope="module")
def diffusion_model():
    pytest.importorskip("diffusers")
    import zoo_diffusion
    from conftest import zoo_dir

    return lambda name, exporter: zoo_diffusion.export_diffusion(name, exporter, zoo_dir())


def channels_by_concat(model: onnx.ModelProto) -> dict[str, int]:
    """The channel count each 4-D Concat writes (the decoder's skip concatenations)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    return {
        n.name: shapes[n.output[0]][1]
        for n in model.graph.node
        if n.op_type == "Concat" and len(shapes.get(n.output[0], ())) == 4
    }


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_diffusion_model_prunes_whole_groups_and_heads(diffusion_model, name, exporter):
    path = diffusion_model(name, exporter)
    report = spa.analyze(path)
    for group in report.groups:
        assert "regroups" not in (group.frozen or ""), group.frozen
        if any(layer.startswith("InstanceNormalization") for layer in group.layers):
            assert group.frozen is None and group.exact, group
    # exact counts: the share removed is the ratio's, whatever widths this machine's kernels prefer
    result = spa.prune(path, ratio=0.3, criterion="l2", compensate=False, round_to=1)
    pruned = result.report
    assert pruned.validation.ok and pruned.validation.soft_equal, pruned.validation.problems
    assert pruned.params_after <= 0.6 * pruned.params_before
    heads = [g for g in pruned.groups if g.kind == "heads"]
    assert len(heads) == HEADED_LAYERS[name] and all(g.removed for g in heads)
    dense, cut = channels_by_concat(onnx.load(str(path))), channels_by_concat(result.model)
    if name != "vae_decoder":  # the decoder has no skips
        assert dense and all(cut[node] < channels for node, channels in dense.items())


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_time_embedding_projection_loses_the_channels_of_its_block(diffusion_model, exporter):
    """A ResNet block adds Linear(t) per channel to its first conv's output: they shrink together."""
    path = diffusion_model("unet2d", exporter)
    result = spa.prune(path, ratio=0.3, criterion="l2", compensate=False)
    gemms = [g for g in result.report.groups if sum(layer.startswith("Gemm") for layer in g.layers) == 1]
    blocks = [g for g in gemms if any(layer.startswith("Conv") and layer.endswith(" out") for layer in g.layers)]
    assert len(blocks) == 8 and all(g.removed for g in blocks)  # a ResNet block each: 2 down, 2 mid, 4 up
