"""The daemon's machinery: the etcd mirror's consumers, lease keeping, the
dataplane managers and the one loop that drives them, and the agent that
composes it all.

May import: model, errors, config, plan, store, dataplane, surfaces.
Only `agent` builds concrete adapters; everything else takes them as
Protocols, so the watch, lease and loop logic run in unit tests with fakes.
"""
