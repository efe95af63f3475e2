"""The multi-host lab on one machine: network namespaces as hosts and
containers, a switch namespace as the underlay, a real etcd, one real
overlayd per host."""
