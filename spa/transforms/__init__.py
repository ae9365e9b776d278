"""Editing the graph: cutting planned units, and refitting the weights that remain."""
