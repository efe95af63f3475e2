"""Data-plane I/O: devices through netlink (pyroute2), per-peer entries
through iproute2's batch mode, and the few sysctls overlayd needs."""
