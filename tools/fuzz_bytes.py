"""Mutation fuzzing: corrupt bytes of a real model and check spa only ever fails cleanly.

    python tools/fuzz_bytes.py [--model models/mini_resnet.onnx] [--seconds 60] [--seed 0]

Every mutant goes through spa.prune (validation on). Anything raised that is not
an spa.SpaError (which the CLI turns into a one-line error and exit code) is a bug;
each distinct one is printed with its traceback. Exit status 1 if any was found.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 2, 4, 16])):
        i = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.6:
            out[i] = rng.randrange(256)
        elif roll < 0.8:
            del out[i : i + rng.randrange(1, 64)]
        else:
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(out)


def fuzz(model: Path, seconds: float, seed: int, max_cases: int | None = None) -> tuple[int, dict[str, str]]:
    import spa

    rng = random.Random(seed)
    data = model.read_bytes()
    found: dict[str, str] = {}
    cases = 0
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "mutant.onnx"
        while time.monotonic() < deadline and (max_cases is None or cases < max_cases):
            path.write_bytes(mutate(data, rng))
            cases += 1
            try:
                # corrupted bytes hit the loader and the rules; l2 without compensation keeps each
                # case cheap so a minute covers hundreds (the data path has its own tests)
                spa.prune(path, ratio=0.4, criterion="l2", compensate=False)
            except spa.SpaError:
                pass
            except Exception as exc:  # noqa: BLE001 - this is what we hunt
                key = f"{type(exc).__name__}: {str(exc)[:100]}"
                found.setdefault(key, traceback.format_exc())
    return cases, found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "mini_resnet.onnx"))
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases, found = fuzz(Path(args.model), args.seconds, args.seed)
    for key, trace in found.items():
        print(f"UNHANDLED {key}\n{trace}")
    print(f"{cases} mutants, {len(found)} distinct unhandled exceptions")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
