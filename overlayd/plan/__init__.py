"""The pure core: lease parsing, subnet picking, desired state and diff.

Nothing in this package does I/O or imports asyncio, pyroute2, aetcd or
subprocess; tests exercise it with plain values.
"""
