"""The daemon's machinery: the etcd mirror's consumers, lease keeping, the
dataplane managers and the one loop that drives them, and the agent that
composes it all.

May import: model, errors, config, plan, store, dataplane, surfaces.
Only `agent` builds the concrete adapters (etcd, the kernel); the mirror,
the lease keeper and the loop take them as Protocols, so they run in unit
tests with fakes.
"""
