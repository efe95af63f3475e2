"""Control-plane I/O: the etcd adapter."""
