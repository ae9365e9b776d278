"""Perplexity of the trained language model, dense against pruned (spa and onnxsim 0.8.1).

    python tools/train_lm.py                       # once: trains and exports the model
    python tools/eval_lm.py [--quick] [--rows width,calib,depth,onnxsim] [--out docs/results/llm-quality.md]

The model is tools/train_lm.py's Llama-style decoder (GQA 8/2 heads, RoPE, RMSNorm, SwiGLU,
hidden 256, 4 layers), exported by onnxruntime-genai's builder at fp32 (``genai-fp32``;
``--export optimum`` takes the Optimum export instead). Perplexity is measured through
onnxruntime on held-out documents the model never trained on, in windows of 128 tokens fed as
a prompt (empty cache), over every next-token prediction in the window.

Rows:

- width: ``spa prune --ratio R`` for R in 0.1, 0.2, 0.3, 0.5 and every criterion, with 128 real
  calibration sequences of 128 tokens from the training text (compensation on, as it is by
  default with data); ``--round-to 1`` so every criterion removes the same channels' count;
- published: ``activation`` (Wanda-sp) and ``fluctuation`` (FLAP's ranking) at the width ratios
  with ``--no-compensate``, as Wanda-sp is published (FLAP adds a bias correction, spa's
  compensation a least-squares refit of the weights left);
- global: ``obs`` ranked across groups (``--global``) with ``--target-params`` at the sizes
  onnxsim's valid rows keep, for a comparison at equal size;
- calib: ratio 0.2, calibration none / 128 self-generated (``--calib-generate 128``) / 128 real,
  for the criteria that run without data and the ones that need it;
- depth: ``--remove-blocks 1`` and ``2`` (Block Influence and random), and width+depth at equal
  parameter count, when spa has ``--remove-blocks``; the same with ``--block-unit mlp`` (the
  unit onnxsim's block pass drops) and ``--block-unit sublayer`` (attention or MLP, whichever
  scores lower);
- onnxsim: ``apply_structured_wanda_pruning`` and ``apply_structured_pruning`` (weight
  magnitude) at the width ratios, and ``apply_transformer_block_pruning`` dropping 1 and 2 blocks,
  on the same real calibration; tools/onnxsim_lm.py says what each matches on which export
  (block dropping only on ``--export optimum``, after fusing its RMSNorm into one node). A row
  onnxsim leaves unchanged says why in its "valid" cell and gets no perplexity.

Every result is checked the same way: onnxruntime runs it, its logits are finite, and a decode
step fed its own prefill's cache runs (``spa.core.decoder.rollout``). "prune s" is the wall time
of the pruning call (spa's includes its own validation). "params kept" counts the weights some
node reads (onnxsim leaves a dropped block's weights in the file, unread).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnxsim_lm  # noqa: E402
import train_lm  # noqa: E402

import spa  # noqa: E402
from spa.core import decoder, runlimit  # noqa: E402
from spa.core.runtime import session  # noqa: E402

LENGTH = 128
CALIB = 128  # calibration sequences
RATIOS = (0.1, 0.2, 0.3, 0.5)
CRITERIA = ("random", "l1", "activation", "fluctuation", "obs", "obspa")
NEEDS_DATA = {"activation", "fluctuation", "obs"}
GROUPS = ("width", "published", "global", "calib", "depth", "onnxsim")
# the params onnxsim's valid rows keep (its magnitude pass at 0.3 and 0.5, its block pass): spa's
# "global" rows are cut to the same size
EQUAL_SIZES = (0.885, 0.862, 0.77)
# what onnxsim's block rows (one and two FFN sub-blocks, 590,080 and 1,180,160 params removed) keep,
# as a fraction of the genai export's dense params: spa's MLP rows are cut to no more than that
BLOCK_SIZES = (0.884987, 0.769973)
_ALIVE: list = []


@dataclass
class Row:
    group: str
    method: str  # "dense", "spa", "onnxsim wanda", "onnxsim magnitude", "onnxsim blocks"
    criterion: str = ""
    ratio: float | None = None
    blocks: int | None = None
    calib: str = "real"  # "none", "generated", "real"
    extra: list[str] = field(default_factory=list)  # more spa prune options
    export: str = ""  # another export of the same weights than the one asked for ("optimum")
    params: int | None = None
    seconds: float | None = None
    valid: str = ""
    ppl: float | None = None

    @property
    def key(self) -> tuple:
        return (
            self.group,
            self.method,
            self.criterion,
            self.ratio,
            self.blocks,
            self.calib,
            tuple(self.extra),
            self.export,
        )

    @property
    def setting(self) -> str:
        parts = [f"ratio {self.ratio}" if self.ratio else "", f"-{self.blocks} blocks" if self.blocks else ""]
        return " ".join(p for p in parts if p) or "-"


# ---------------------------------------------------------------- data


def windows(ids: np.ndarray, count: int) -> np.ndarray:
    """``count`` windows of LENGTH tokens spread evenly over ``ids`` (deterministic)."""
    starts = np.linspace(0, len(ids) - LENGTH - 1, count).astype(int)
    return np.stack([ids[s : s + LENGTH] for s in starts]).astype(np.int64)


def calibration_folder(folder: Path) -> Path:
    """128 training windows as ``input_ids.npy``: the model's only input spa does not fill in."""
    target = folder / "real"
    target.mkdir(parents=True, exist_ok=True)
    np.save(target / "input_ids.npy", windows(np.load(train_lm.lm_dir() / "train.npy"), CALIB))
    return target


# ---------------------------------------------------------------- measuring


def _prompt_feed(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    cache = decoder.layout(model)
    assert cache is not None and cache.ids is not None
    feed = decoder.feed(model, cache, ids.shape[0], 0, ids.shape[1], np.random.default_rng(0))
    feed[cache.ids] = ids.astype(feed[cache.ids].dtype)
    return feed


def _logits_name(model: onnx.ModelProto) -> str:
    return next(o.name for o in model.graph.output if "logits" in o.name)


def perplexity(model: onnx.ModelProto, held: np.ndarray, batch: int = 8) -> float:
    run, name = session(model), _logits_name(model)
    total, count = 0.0, 0
    for start in range(0, len(held), batch):
        ids = held[start : start + batch]
        logits = runlimit.run(run, [name], _prompt_feed(model, ids))[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = ids[:, 1:]
        picked = np.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)
        total -= float(picked.sum())
        count += targets.size
    return math.exp(total / count)


def validity(model: onnx.ModelProto, held: np.ndarray) -> str:
    """Runs in onnxruntime, finite logits, a decode step from its own prefill's cache."""
    try:
        run, name = session(model), _logits_name(model)
        logits = runlimit.run(run, [name], _prompt_feed(model, held[:2]))[0]
        if not np.isfinite(logits).all():
            return "non-finite logits"
        wanted = [o.name for o in model.graph.output]
        first, second = decoder.rollout(model, lambda feed: dict(zip(wanted, runlimit.run(run, wanted, feed))))
        if not np.isfinite(second[name]).all():
            return "decode: non-finite logits"
    except Exception as exc:  # noqa: BLE001 - a result that does not run is reported, not raised
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return "valid"


def params(model: onnx.ModelProto) -> int:
    read = {name for node in model.graph.node for name in node.input}
    weights = (t for t in model.graph.initializer if t.data_type in (1, 10, 11, 16) and t.name in read)
    return sum(int(np.prod(t.dims)) for t in weights)


# ---------------------------------------------------------------- pruning


def prune_spa(path: Path, row: Row, real: Path) -> onnx.ModelProto:
    kwargs: dict = dict(criterion=row.criterion, round_to=1, seed=0, calib_samples=CALIB)
    if row.calib == "real":
        kwargs["calib"] = real
    elif row.calib == "generated":
        kwargs.update(calib_generate=CALIB, calib_length=LENGTH)
    if row.blocks is not None:
        return _spa_cli(path, row, real)
    if "--no-compensate" in row.extra:
        kwargs["compensate"] = False
    if "--global" in row.extra:
        kwargs["global_rank"] = True
    if "--target-params" in row.extra:
        kwargs["target_params"] = float(row.extra[row.extra.index("--target-params") + 1])
    result = spa.prune(path, row.ratio, **kwargs)
    print("  spa seconds:", result.report.as_dict().get("seconds"), flush=True)
    _ALIVE.append(result)  # the cut weights live in its scratch folder until it goes
    return result.model


def _spa_cli(path: Path, row: Row, real: Path) -> onnx.ModelProto:
    """Depth rows through the CLI: ``--remove-blocks`` has no Python API counterpart to rely on."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "spa", "prune", str(path), "-o", f"{out}/m.onnx", "--round-to", "1"]
        command += ["--remove-blocks", str(row.blocks), "--criterion", row.criterion or "obspa", *row.extra]
        if row.ratio:
            command += ["--ratio", str(row.ratio)]
        if row.calib == "real":
            command += ["--calib", str(real)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            )
        return onnx.load(f"{out}/m.onnx")


def onnxsim_batches(model: onnx.ModelProto, real: Path, batch: int = 8) -> list[dict[str, np.ndarray]]:
    ids = np.load(real / "input_ids.npy")
    return [_prompt_feed(model, ids[s : s + batch]) for s in range(0, len(ids), batch)]


def prune_onnxsim(path: Path, row: Row, real: Path) -> tuple[onnx.ModelProto, str | None]:
    model = onnx.load(path)
    return onnxsim_lm.prune(model, row.method, onnxsim_batches(model, real), row.ratio, row.blocks)


def measure(path: Path, row: Row, real: Path, held: np.ndarray) -> Row:
    start, unchanged = time.perf_counter(), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if row.method == "dense":
                model = onnx.load(path)
            elif row.method == "spa":
                model = prune_spa(path, row, real)
            else:
                model, unchanged = prune_onnxsim(path, row, real)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result of the row
        row.valid = f"refused: {str(exc).splitlines()[0][:80]}" if str(exc) else type(exc).__name__
        return row
    row.seconds = None if row.method == "dense" else time.perf_counter() - start
    row.params, row.valid = params(model), unchanged or validity(model, held)
    if row.valid == "valid":
        row.ppl = perplexity(model, held)
    _ALIVE.clear()
    return row


# ---------------------------------------------------------------- the grid


def has_remove_blocks() -> bool:
    done = subprocess.run([sys.executable, "-m", "spa", "prune", "--help"], capture_output=True, text=True, cwd=ROOT)
    return "--remove-blocks" in done.stdout


def grid(groups: list[str], quick: bool, ratios: tuple[float, ...], criteria: tuple[str, ...]) -> list[Row]:
    ratios = (0.2,) if quick else ratios
    criteria = tuple(c for c in criteria if c != "random") if quick else criteria
    rows = [Row("dense", "dense", calib="")]
    if "width" in groups:
        rows += [Row("width", "spa", c, r) for r in ratios for c in criteria]
    if "published" in groups:  # Wanda-sp and FLAP's ranking as published: no least-squares refit after it
        published = ("activation", "fluctuation")
        rows += [Row("published", "spa", c, r, extra=["--no-compensate"]) for r in ratios for c in published]
    if "global" in groups:  # ranked across groups, at the sizes onnxsim's rows kept
        for kept in EQUAL_SIZES:
            rows += [Row("global", "spa", "obs", extra=["--global", "--target-params", str(kept)])]
    if "calib" in groups:
        for criterion in [c for c in ("l1", "obspa", "activation", "fluctuation", "obs") if c in criteria]:
            rows += [Row("calib", "spa", criterion, 0.2, calib=c) for c in ("none", "generated")]
    if "depth" in groups and has_remove_blocks():
        for blocks in (1, 2):
            rows += [Row("depth", "spa", "obspa", blocks=blocks)]
            rows += [Row("depth", "spa", "obspa", blocks=blocks, extra=["--block-score", "random"])]
        rows += [Row("depth", "spa", "obspa", 0.2, blocks=1)]
        for unit in ("mlp", "sublayer"):  # sub-blocks: onnxsim's block pass drops MLPs alone
            for blocks in (1, 2):
                rows += [Row("depth", "spa", "obspa", blocks=blocks, extra=["--block-unit", unit])]
            rows += [Row("depth", "spa", "obspa", blocks=1, extra=["--block-unit", unit, "--block-score", "random"])]
        for blocks, kept in zip((1, 2), BLOCK_SIZES):  # strictly no more params than onnxsim's rows
            rows += [
                Row("depth", "spa", "obspa", blocks=blocks, extra=["--block-unit", "mlp", "--target-params", str(kept)])
            ]
        for unit in ("layer", "mlp"):  # the same blocks without their means
            for blocks in (1, 2):
                rows += [Row("depth", "spa", "obspa", blocks=blocks, extra=["--block-unit", unit, "--no-compensate"])]
    if "onnxsim" in groups:
        rows += [Row("onnxsim", "onnxsim wanda", "wanda", r) for r in ratios]
        rows += [Row("onnxsim", "onnxsim magnitude", "l2 magnitude", r, calib="none") for r in ratios]
        # the block pass matches only the Optimum export (tools/onnxsim_lm.py): same weights
        rows += [Row("onnxsim", "dense", calib="", export="optimum")]
        rows += [Row("onnxsim", "onnxsim blocks", "block influence", blocks=b, export="optimum") for b in (1, 2)]
    return rows


def table(rows: list[Row]) -> str:
    header = (
        "| rows | method | criterion | setting | calibration | export | params kept | prune s | valid | perplexity |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        base = dense_params(rows, row)
        kept = f"{row.params / base:.3f}" if row.params and base else "-"
        seconds = f"{row.seconds:.1f}" if row.seconds is not None else "-"
        ppl = f"{row.ppl:.3f}" if row.ppl is not None else "-"
        name = row.criterion + (" " + " ".join(row.extra) if row.extra else "")
        export = row.export or "genai-fp32"
        cells = [
            row.group,
            row.method,
            name or "-",
            row.setting,
            row.calib or "-",
            export,
            kept,
            seconds,
            row.valid,
            ppl,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(rows: list[Row]) -> list[str]:
    """The claims the table is measured against, each with the numbers it rests on."""
    found = []
    ppl = {(r.method, r.criterion, r.ratio, r.calib, r.blocks, tuple(r.extra)): r.ppl for r in rows}
    for extra, how in (((), "each refitted"), (("--no-compensate",), "FLAP and Wanda-sp as published")):
        for ratio in RATIOS:
            obs = ppl.get(("spa", "obs", ratio, "real", None, ()))
            flap, wanda = (ppl.get(("spa", c, ratio, "real", None, extra)) for c in ("fluctuation", "activation"))
            if None not in (obs, flap, wanda):
                verdict = "yes" if obs < flap and obs < wanda else "no"
                found.append(
                    f"- ratio {ratio} ({how}): obs {obs:.3f}, fluctuation {flap:.3f}, activation {wanda:.3f}: "
                    f"obs lowest: {verdict}"
                )
    for criterion in ("l1", "obspa"):
        none, gen, real = (ppl.get(("spa", criterion, 0.2, c, None, ())) for c in ("none", "generated", "real"))
        if None not in (none, gen, real) and none != real:
            closed = (none - gen) / (none - real)
            found.append(
                f"- {criterion} at 0.2: none {none:.2f}, generated {gen:.2f}, real {real:.2f}: "
                f"generated closes {closed:.0%} of the gap"
            )
    dense = rows[0].params or 1
    for row in rows:
        if row.method.startswith("onnxsim") and row.params == dense_params(rows, row):
            found.append(f"- onnxsim {row.criterion} at {row.setting}: removed nothing ({row.valid})")
    for sim in (r for r in rows if r.method.startswith("onnxsim") and r.ppl and r.params != dense_params(rows, r)):
        # equal reduction: spa's rows that remove at least as many parameters as onnxsim's (the
        # exports count a few tensors differently, so fractions of each dense model would not do)
        removed = (dense_params(rows, sim) or 0) - (sim.params or 0)
        kept = (sim.params or 0) / (dense_params(rows, sim) or 1)
        ours = [r for r in rows if r.method == "spa" and r.ppl and r.params and dense - r.params >= removed]
        if ours:
            best = min(ours, key=lambda r: r.ppl or math.inf)
            verdict = "spa lower" if (best.ppl or math.inf) < sim.ppl else "onnxsim lower"
            found.append(
                f"- {sim.method} {sim.setting} ({kept:.3f} kept): {sim.ppl:.3f}; spa's best at no more "
                f"params: {best.ppl:.3f} ({best.criterion} {' '.join(best.extra)} {best.setting}, "
                f"{best.params / dense:.3f} kept): {verdict}"
            )
    return found


def dense_params(rows: list[Row], row: Row) -> int | None:
    """The params of the dense model of ``row``'s export (the block pass runs on another export)."""
    return next((r.params for r in rows if r.method == "dense" and r.export == row.export), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(GROUPS), help=f"groups of rows ({', '.join(GROUPS)})")
    parser.add_argument("--quick", action="store_true", help="ratio 0.2 only, without random")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="width ratios (default: all)")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="spa's criteria (default: all)")
    parser.add_argument("--export", choices=("genai-fp32", "optimum"), default="genai-fp32")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of 128 tokens (default 64)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here (for --reuse)")
    parser.add_argument("--reuse", type=Path, help="rows measured before (a --json file): not measured again")
    args = parser.parse_args(argv)
    path = train_lm.lm_dir() / args.export / "model.onnx"
    if not path.exists():
        print(f"no trained model at {path}: run python tools/train_lm.py first", file=sys.stderr)
        return 2
    held = windows(np.load(train_lm.lm_dir() / "heldout.npy"), args.windows)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    rows = grid(args.rows.split(","), args.quick, ratios, tuple(args.criteria.split(",")))
    if args.reuse:
        known = {r.key: r for r in (Row(**d) for d in json.loads(args.reuse.read_text()))}
        rows = [known.get(r.key, r) for r in rows] + [r for k, r in known.items() if k not in {x.key for x in rows}]
    with tempfile.TemporaryDirectory() as scratch:
        real = calibration_folder(Path(scratch))
        for done, row in enumerate(rows, start=1):
            if row.valid:  # measured before (--reuse)
                continue
            measure(train_lm.lm_dir() / row.export / "model.onnx" if row.export else path, row, real, held)
            ppl = f"{row.ppl:.2f}" if row.ppl else "-"
            print(
                f"{row.group} {row.method} {row.criterion} {row.setting} {row.calib}: {row.valid} ppl {ppl} "
                f"({row.seconds or 0:.1f} s)",
                flush=True,
            )
            _write(rows[:done], args.out, args.json)  # after every row: a grid cut short keeps what it measured
    print(_write(rows, args.out, args.json))
    return 0


def _write(rows: list[Row], out: Path | None, rows_json: Path | None) -> str:
    report = _report(rows)
    if out:
        out.write_text(report)
    if rows_json:
        rows_json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return report


def _report(rows: list[Row]) -> str:
    notes = findings(rows)
    return table(rows) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


if __name__ == "__main__":
    sys.exit(main())
