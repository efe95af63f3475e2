"""The pure core: lease parsing, subnet picking, desired state per kind of
kernel object, keyed diffs, egress rules, the diagnosis.

Nothing in this package does I/O or imports asyncio, pyroute2, aetcd or
subprocess; it may import only model, errors and config. Tests exercise it
with plain values.
"""
