"""Pieces used by more than one model family: errors, weight reading, hub downloads, devices, warping."""
