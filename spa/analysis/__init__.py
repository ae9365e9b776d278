"""Coupling groups and the linear layers that read them."""
