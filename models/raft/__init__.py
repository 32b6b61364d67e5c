"""RAFT optical flow (torchvision's architecture and weights), used by Stream-DiffVSR for its temporal guidance.

``network`` the model, ``correlation`` its lookups, ``estimator`` the configured flow function, ``weights``
torchvision's files (download, checks, strict loading), ``visualise`` the colour-wheel picture.
"""
