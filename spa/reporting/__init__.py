"""Params and FLOPs, and the reports spa writes."""
