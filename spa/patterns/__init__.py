"""Analyses that span several ops: attention roles, decomposed norms, round-trips, shape arithmetic."""
