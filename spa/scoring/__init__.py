"""Ranking the units of each group: criteria, activation statistics, OBS maths."""
