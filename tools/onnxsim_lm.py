"""onnxsim 0.8.1's pruning passes on the trained language model, each on the graph form it matches.

What onnxsim matches on this model (its docstrings, and checked on the exports):

- ``apply_structured_wanda_pruning`` runs onnxsim's C++ port, whose gated-FFN matcher does not
  recognise SiLU exported as ``x * Sigmoid(x)``: "A gate activation decomposed into more than one
  node (e.g. SiLU exported as the self-referencing ``x * Sigmoid(x)`` rather than a single
  ``Sigmoid``/native ``Swish``) isn't recognized -- that block is safely left untouched". Both
  exports write SiLU that way, so it returns the model unchanged, with or without calibration.
- ``apply_structured_pruning`` (pure Python, weight magnitude, no calibration) does cross that
  SiLU diamond and prunes the gated FFN channels of every layer, on either export.
- ``apply_transformer_block_pruning`` needs a bare ``Add`` merge ("a
  ``SkipLayerNormalization``-family node is never recognized in that role"), a one-node entry
  norm, and known shapes. The builder export merges through SkipSimplifiedLayerNormalization
  (no ``Add`` at all); the Optimum export writes RMSNorm as Pow/ReduceMean/Sqrt/Div/Mul, so the
  block reads its input raw and is declined. ``block_form`` fuses only RMSNorm into one
  SimplifiedLayerNormalization node with onnxruntime's transformer optimizer (a form onnxsim
  documents accepting) and annotates shapes; then the FFN sub-blocks match. Attention sub-blocks
  still decline: their ``present.*`` cache outputs leave the block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

Batches = Sequence[dict[str, np.ndarray]]

WANDA_DECLINES = "no change: onnxsim's C++ Wanda matcher skips SiLU written as x*Sigmoid(x)"
BLOCKS_DECLINE = "no change: merges are SkipSimplifiedLayerNormalization, not the bare Add onnxsim needs"
KEEP_FUSIONS = {"enable_layer_norm", "enable_shape_inference"}


def block_form(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` with RMSNorm fused into single nodes and shapes annotated, or None when its
    residual merges are already fused into SkipSimplifiedLayerNormalization (nothing to match)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if any(node.op_type.startswith("Skip") for node in model.graph.node):
        return None
    options = FusionOptions("gpt2")
    for name, value in vars(options).items():
        # Only RMSNorm fusion (it needs the optimizer's shape inference): a skip-norm fusion
        # would swallow the Add merges onnxsim needs.
        if name.startswith("enable_") and value is True and name not in KEEP_FUSIONS:
            setattr(options, name, False)
    fused = optimize_model(model, model_type="gpt2", optimization_options=options, opt_level=0).model
    # onnx's own inference knows no SimplifiedLayerNormalization, and onnxsim declines a block
    # whose input and output shapes it cannot confirm equal.
    return SymbolicShapeInference.infer_shapes(fused, auto_merge=True)


def prune(model: onnx.ModelProto, method: str, data: Batches, ratio: float | None, blocks: int | None):
    """(pruned model, None) or (model, why onnxsim left it unchanged)."""
    import onnxsim

    if method == "onnxsim wanda":
        out = onnxsim.apply_structured_wanda_pruning(model, calibration_data=data, sparsity=ratio)
        return out, WANDA_DECLINES if _same(out, model) else None
    if method == "onnxsim magnitude":
        return onnxsim.apply_structured_pruning(model, sparsity=ratio), None
    ready = block_form(model)
    if ready is None:
        return model, BLOCKS_DECLINE
    return onnxsim.apply_transformer_block_pruning(ready, calibration_data=data, num_blocks_to_drop=blocks), None


def _same(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return [tuple(t.dims) for t in a.graph.initializer] == [tuple(t.dims) for t in b.graph.initializer]
