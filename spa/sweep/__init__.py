"""``spa sweep``: prune a model at every point of a grid and measure each, to see how far it can go."""
