"""What the commands print: the prune summary, the analysis listing and the latency table."""

from __future__ import annotations

from pathlib import Path

from spa.cli.blocks import depth_lines
from spa.core.runtime import format_sizes
from spa.pipeline.summary import verdict
from spa.reporting.group_layers import is_ffn
from spa.scoring.statistics import SMOOTH_NOISE


def bench_table(results) -> str:
    lines = ["| provider | threads | batch | model | median ms | p90 ms | samples/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for label, t in r.timings.items():
            lines.append(
                f"| {r.provider} | {r.threads or 'default'} | {r.batch} | {label} | {t.median_ms:.3f} | "
                f"{t.p90_ms:.3f} | {t.throughput:.1f} |"
            )
    speedups = [f"{r.provider}: {r.speedup:.2f}x" for r in results if r.speedup is not None]
    if speedups:
        lines.append("speedup (dense / pruned median): " + ", ".join(speedups))
    if results:
        lines.append("sizes: " + format_sizes(results[0].sizes))
    return "\n".join(lines)


def guessed_sizes_warning(results) -> str | None:
    """The warning for free axes spa sized by a guess: latency at a size the model may never see."""
    guessed = results[0].guessed if results else []
    if not guessed:
        return None
    return (
        f"spa: warning: {', '.join(guessed)} {'is a free axis' if len(guessed) == 1 else 'are free axes'} "
        "that spa sized by a guess; --input-shape NAME=AxBxC times the size you deploy at"
    )


def human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def change(before: int, after: int) -> str:
    pct = 100.0 * (after - before) / before if before else 0.0
    return f"{human(before)} -> {human(after)} ({pct:+.1f}%)"


def counted_at(r: dict) -> str:
    """Where FLOPs depend on free axes, the sizes they were counted at."""
    given = r["input_shapes"] if "input_shapes" in r else r["options"]["input_shapes"]
    text = f" at {format_sizes(r['flops_at'])}" if r["unsized_axes"] or given else ""
    if r["unsized_axes"]:
        text += f" (free axes {', '.join(r['unsized_axes'])} counted as 1; --input-shape sets them)"
    if r.get("flops_uncounted"):
        named = ", ".join(f"{op} x{n}" for op, n in r["flops_uncounted"].items())
        text += f" (not counted, output shapes unknown: {named})"
    return text


def experts_line(e: dict) -> str:
    before, after = sorted(set(e["experts_before"])), sorted(set(e["experts_after"]))
    counts = f"{'/'.join(map(str, before))} -> {'/'.join(map(str, after))}"
    how = "masked (the router never picks them)" if e["soft"] else "removed with their router columns"
    k = f", top-k {'/'.join(map(str, sorted(set(e['k_after']))))}" if e["k_after"] != e["k_before"] else ""
    return (
        f"experts: {counts} per layer in {len(e['layers'])} MoE layer(s), {how}{k}; "
        f"ranked by routing weight x output on {e['data']} tokens"
    )


def prune_summary(r: dict) -> str:
    v = r["validation"]
    lines = [
        f"groups: {r['groups_found']} found, {r['groups_prunable']} prunable, {r['groups_pruned']} pruned",
        *depth_lines(r.get("depth")),
        f"params: {change(r['params_before'], r['params_after'])}",
        f"FLOPs:  {change(r['flops_before'], r['flops_after'])}{counted_at(r)}",
    ]
    if r["options"].get("attention_unit"):
        lines.append(f"heads:  {r['options']['attention_unit']}")
    summary = r.get("summary")
    if r.get("experts"):
        lines.append(experts_line(r["experts"]))
    if summary:
        lines.append(sizes_line(summary["sizes"]))
    if v["checker"] != "not run":
        soft = (
            "n/a"
            if v["soft_equal"] is None
            else f"{'equal' if v['soft_equal'] else 'DIFFERENT'} (rel. err {v['soft_max_rel_error']:.1e})"
        )
        if v.get("approximate_groups"):
            soft += f" on exact groups; {v['approximate_groups']} approximate not compared"
        if v.get("dense_nonfinite"):
            soft += (
                f" where finite (the input model's {', '.join(v['dense_nonfinite'])} holds NaN or inf on "
                f"the sample inputs)"
            )
        lines.append(
            f"valid:  checker {v['checker']}, onnxruntime {'runs' if v['runs'] else 'FAILS'}, "
            f"I/O {'same' if v['io_match'] else 'DIFFERENT'}, soft==hard {soft}"
            + (", prefill and decode step from its own cache" if v.get("decode_checked") else "")
        )
    if v.get("changed_io"):
        names = [line.split(":")[0] for line in v["changed_io"]]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"        cache I/O shrank on its head axis: {shown} (the JSON report lists the shapes)")
    if not r.get("depth"):
        lines.extend(fidelity_lines(v.get("fidelity")))
    elif r["groups_pruned"]:  # the blocks' lines hold the figures against the model as given
        lines.extend(fidelity_lines(v.get("fidelity"), "the width cut vs the model the blocks left"))
    lines.extend(data_lines(r))
    if summary and r["groups_pruned"]:  # nothing removed: nothing to say about accuracy
        lines.append(accuracy_line(summary["accuracy"], r["params_before"], r["params_after"]))
    # with blocks removed first, the width stage's timings are against the model the blocks left
    against = " vs the model the blocks left" if r.get("depth") else ""
    for pair in v["latency"]:
        where = pair["provider"].replace("ExecutionProvider", "")
        threads = f", {pair['threads']} thread{'s' if pair['threads'] > 1 else ''}" if pair["threads"] else ""
        lines.append(
            f"latency ({where}{threads}, median): {pair['dense_ms']:.2f} ms -> {pair['pruned_ms']:.2f} ms "
            f"({pair['speedup']:.2f}x, {SPEED_WORDS[verdict(pair['speedup'])]}){against}"
        )
    if summary:
        lines.extend(speed_lines(summary["speed"]))
    if r["widths"]:
        w = r["widths"]
        lines.append(
            f"widths: {w['layers']} layers, {w['groups_timed']} groups timed at their candidate widths "
            f"({w['measured']} timings measured, {w['cached']} cached; {w['seconds']:.1f} s)"
        )
    if r["target"]:
        t = r["target"]
        state = "met" if t["met"] else "NOT met"
        lines.append(
            f"target: {t['metric']} {t['goal']:g} of {'what the blocks left' if against else 'dense'} -> "
            f"{t['achieved']:.3f} at ratio {t['ratio']:.4f} "
            f"({state}; {len(t['probes'])} candidates measured)"
            + (
                f"; cut spread by {t['allocation']} ("
                + ", ".join(f"{k} {v:.2f} ms" for k, v in t["allocation_ms"].items())
                + ")"
                if t.get("allocation")
                else ""
            )
        )
    for check in r["export"]:
        lines.append(f"{check['target']}: {check['summary']}")
    if r["output"]:
        data = r.get("output_data")
        beside = (
            f" (weights in {data}: {Path(r['output']).name}.data is the input's)"
            if data and Path(data).name != f"{Path(r['output']).name}.data"
            else ""
        )
        lines.append(f"wrote {r['output']}{beside}")
        lines.extend(f"        {line}" for line in r.get("runtime_config") or [])
    else:
        lines.append(
            "nothing to prune: every group is frozen (see `spa analyze`); no file written "
            "(--write-unchanged writes a copy)"
        )
    return "\n".join(lines)


SPEED_WORDS = {"faster": "faster", "no faster": "no faster", "slower": "SLOWER"}
# why a figure was not taken, in the words of the option that decided it
NOT_TAKEN = {"not asked": "--no-bench", "validation was skipped": "--no-validate"}


def sizes_line(sizes: dict) -> str:
    """The input sizes FLOPs were counted, validation ran and latency was timed at."""
    text = f"sizes:  FLOPs at {_shape_sets([sizes['flops']])}"
    if sizes["validation"]:
        text += f"; validated at {_shape_sets(sizes['validation'])}"
    if sizes["latency"]:
        text += f"; timed at {_shape_sets([sizes['latency']])}"
    if sizes["free_axes"]:
        text += " (free axes: --input-shape sets them)"
    return text


def _shape_sets(sets: list[dict]) -> str:
    if all(len(s) == 1 for s in sets):  # one input: its name adds nothing
        return ", ".join("x".join(map(str, shape)) for s in sets for shape in s.values())
    return " and ".join(format_sizes(s) for s in sets)


def accuracy_line(accuracy: dict, params_before: int, params_after: int) -> str:
    if accuracy["measured"]:
        if accuracy["top1_agreement"] is not None:
            figures = f"top-1 agreement {accuracy['top1_agreement']:.1%}, cosine {accuracy['cosine']:.4f}"
        else:
            figures = f"outputs at rel. error {accuracy['relative_error']:.3f}, cosine {accuracy['cosine']:.4f}"
        text = f"accuracy: {figures} against the dense model on {accuracy['samples']} {accuracy['source']}"
        if accuracy["optimistic"]:
            text += " (optimistic: none held out)"
        return text
    if accuracy["remedy"] == "--calib DATA":
        removed = 1 - params_after / params_before if params_before else 0.0
        lost = f" ({removed:.0%} of the parameters removed)" if removed >= 0.005 else ""
        return f"accuracy: not measured on real data{lost}; --calib DATA measures it on held-out samples"
    why = NOT_TAKEN.get(accuracy["why_not"], accuracy["why_not"])
    return f"accuracy: not measured ({why})"


def speed_lines(speed: dict) -> list[str]:
    if not speed["timed"]:
        return [f"latency: not timed ({NOT_TAKEN.get(speed['why_not'], speed['why_not'])})"]
    if not speed["advice"]:
        return []
    lines = [f"        not faster: {speed['advice'][0]}"]
    lines.extend(f"        {advice}" for advice in speed["advice"][1:])
    return lines


FIDELITY_LINES = 4  # outputs listed; the JSON report has every one


def fidelity_lines(fidelity: dict | None, compared: str = "outputs vs dense") -> list[str]:
    if not fidelity or not fidelity["outputs"]:
        return []
    lines = [f"{compared} on {fidelity['samples']} {fidelity['source']}:"]
    if not fidelity["source"].startswith("held-out"):
        lines[0] += " (optimistic: the refit fitted them; samples past --calib-samples are held out)"
    if fidelity.get("padded_positions"):
        lines[0] += f" ({fidelity['padded_positions']} padded positions left out)"
    for output in fidelity["outputs"][:FIDELITY_LINES]:
        text = f"        {output['name']}: rel. error {output['relative_error']:.3f}, cosine {output['cosine']:.4f}"
        if output["top1_agreement"] is not None:
            text += f", top-1 agreement {output['top1_agreement']:.1%}"
        lines.append(text)
    if len(fidelity["outputs"]) > FIDELITY_LINES:
        lines.append(f"        ... {len(fidelity['outputs']) - FIDELITY_LINES} more outputs in --json")
    return lines


def data_lines(r: dict) -> list[str]:
    lines = []
    stats, comp = r.get("statistics"), r.get("compensation")
    criterion = r["options"]["criterion"]
    if stats:
        lines.append(
            f"scored: {criterion}, statistics of {stats['tensors']} layer inputs from {stats['samples']} "
            f"{stats['source']} samples ({stats['seconds']:.1f} s)"
        )
        if stats.get("padded_tokens"):
            lines.append(f"        {stats['padded_tokens']} padded token positions (attention mask 0) left out")
        if stats.get("input_prior"):
            imbalance = stats["prior_imbalance"]
            default = SMOOTH_NOISE.name
            chosen = f"synthetic inputs: {stats['input_prior']}"
            if imbalance and stats["input_prior"] != default:
                chosen += (
                    f" (channel imbalance {imbalance[stats['input_prior']]:.2f}, "
                    f"against {imbalance[default]:.2f} for {default})"
                )
            lines.append("        " + chosen)
    elif criterion in ("obspa",):
        lines.append(f"scored: {criterion} with the identity Hessian (no statistics: the model was not run)")
    elif (r.get("summary") or {}).get("statistics", {}).get("why_none"):
        lines.append(f"scored: {criterion}, no statistics ({r['summary']['statistics']['why_none']})")
    if r.get("fallback_groups"):
        lines.append(f"        {r['fallback_groups']} group(s) no linear layer reads were ranked by l2")
    if comp and comp["layers"]:
        lines.append(
            f"compensated: {comp['layers']} layers ({comp['biases']} biases); layer output error "
            f"{comp['uncompensated_error']:.2e} -> {comp['mean_output_error']:.2e} on the statistics"
        )
    sequential = (comp or {}).get("sequential")
    if sequential:
        lines.append(
            f"        sequential refit: {sequential['layers']} layers in {sequential['passes']} passes over "
            f"{sequential['samples']} samples ({sequential['seconds']:.1f} s); output error on the pruned "
            f"model's inputs {sequential['layerwise_error']:.2e} layer-wise -> "
            f"{sequential['sequential_error']:.2e}"
        )
    held_out = (comp or {}).get("held_out_error")
    if comp and held_out:
        lines.append(
            f"        kept the {comp['refit']} refit: held-out output error {held_out['layerwise']:.3f} "
            f"layer-wise, {held_out['sequential']:.3f} sequential"
        )
    requantized = (sequential or {}).get("requantized") or (comp or {}).get("requantized")
    if requantized:
        lines.append(
            f"        quantized weights: {requantized['tensors']} refitted tensors written back quantized, "
            f"{requantized['grown']} scales grown to fit, {requantized['saturated']} of "
            f"{requantized['values']} values saturated"
        )
    for why in (comp or {}).get("skipped", [])[:3]:
        lines.append(f"        not compensated: {why}")
    return lines


def analysis_text(data: dict, verbose: bool) -> str:
    lines = [
        f"{data['model']}: {data['groups_found']} groups, {data['groups_prunable']} prunable; "
        f"params {human(data['params'])}, FLOPs {human(data['flops'])}{counted_at(data)}"
    ]
    shares = [
        f"{op} {100 * flops / data['flops']:.1f}%"
        for op, flops in data["flops_by_op_type"].items()
        if data["flops"] and flops / data["flops"] >= 0.001
    ]
    if shares:
        lines.append(f"  FLOPs by op: {', '.join(shares)} (--json lists every node)")
    if data.get("unruled_weights"):
        named = ", ".join(f"{op} x{n}" for op, n in data["unruled_weights"].items())
        lines.append(f"  weights left whole (spa has no rule for these ops): {named}")
    attention = [g for g in data["groups"] if g.get("kind")]
    if attention:
        lines.append(f"  attention: {len(attention)} groups whose units are {attention[0]['kind'].replace('_', ' ')}")
        for g in attention:
            shared = ""
            if g.get("kv_heads"):
                each = g["heads"] // g["kv_heads"]
                unit = {
                    "heads": f"a KV head with its {each} query heads",
                    "query_heads": f"one query head in each of the {g['kv_heads']} KV groups",
                }.get(g["kind"])
                shared = f" ({g['kv_heads']} KV heads{', unit: ' + unit if unit else ''})"
            lines.append(
                f"    group {g['id']:>4}: {g['heads']} heads x head_dim {g['head_dim']}{shared}, "
                f"{'prunable' if g['frozen'] is None else 'frozen'}"
            )
    ffn = [g for g in data["groups"] if is_ffn(g)]
    if ffn:
        lines.append(f"  feed-forward: {len(ffn)} hidden groups")
        for g in ffn:
            lines.append(
                f"    group {g['id']:>4}: {g['channels']} ch, {'prunable' if g['frozen'] is None else 'frozen'}"
            )
    for g in data["groups"]:
        if g["channels"] <= 1 and not verbose:
            continue
        state = "prunable" if g["frozen"] is None else "frozen"
        kind = "exact" if g["exact"] else "approximate"
        layers = ", ".join(g["layers"][:4]) + (f", +{len(g['layers']) - 4} more" if len(g["layers"]) > 4 else "")
        lines.append(f"  group {g['id']:>4}: {g['channels']:>5} ch  {state:<8} {kind:<11} {layers or '-'}")
        if g["frozen"]:
            lines.append(f"               why frozen: {g['frozen']}")
        if g.get("approximate") and g["approximate"] not in (g["frozen"] or ""):
            lines.append(f"               approximate: {g['approximate']}")
        if verbose:
            lines.append(f"               dims: {', '.join(g['dims'])}")
    hidden = sum(1 for g in data["groups"] if g["channels"] <= 1)
    if hidden and not verbose:
        lines.append(f"  ({hidden} single-channel groups not shown; --verbose lists them)")
    return "\n".join(lines)
