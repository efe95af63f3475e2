"""The multi-host lab on one machine: network namespaces as hosts and
containers, a switch namespace as the underlay, a real etcd, one real
overlayd per host; and the benchmarks and fault drills that run on it.

May import anything in overlayd; nothing in overlayd outside cli imports it.
"""
