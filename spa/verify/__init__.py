"""Running models: validation, fidelity and latency."""
