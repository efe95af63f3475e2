"""Command-line entry points: `overlayd` (the daemon), `overlayctl` (the
operator's tool) and `overlay-cni` (the CNI plugin).

May import anything; the lab is imported lazily, only by `overlayctl lab`.
"""
