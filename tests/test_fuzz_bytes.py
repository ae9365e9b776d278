"""Corrupted real models never escape as anything but spa's own errors."""

from pathlib import Path

import fuzz_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_byte_mutants_fail_cleanly():
    # a fixed seed and case count keep CI reproducible; the time cap bounds a slow machine
    cases, found = fuzz_bytes.fuzz(ROOT / "models" / "mini_resnet.onnx", seconds=60, seed=1234, max_cases=600)
    assert cases >= 100
    assert not found, "\n".join(found.values())
