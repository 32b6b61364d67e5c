"""RAFT optical flow (torchvision's architecture and weights), used by Stream-DiffVSR for its temporal guidance.

``network`` the model, ``correlation`` its lookups, ``estimator`` the configured flow function, ``weights``
torchvision's files (download, checks, strict loading), ``visualise`` the colour-wheel picture.
"""

# The flow options that lower its memory, the most useful first, as (option, value): the same flow in bounded
# memory, then the flow at half resolution.
MEMORY_OPTIONS = (("corr", "on_demand"), ("flow_downscale", 2))
