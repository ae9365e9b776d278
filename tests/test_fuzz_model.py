"""Structurally mutated models (types, dims, attributes, names, external data, topology) never
give an internal error, a traceback, a hang, leftovers or a changed input."""

import fuzz_model


def test_structured_mutants_fail_cleanly(tmp_path):
    # a fixed seed and case count keep CI reproducible; the time cap bounds a slow machine
    cases, found, exits = fuzz_model.fuzz(seconds=45, seed=2024, max_cases=80, timeout=60, findings=tmp_path)
    assert cases >= 20
    assert not found, "\n\n".join("\n".join(lines) for lines, _ in found)
    assert exits.get(0) and exits.get(3)  # the mutants reach both a clean load and a refusal
