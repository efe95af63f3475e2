"""overlayd: a VXLAN overlay agent that leases per-host subnets from etcd."""

__version__ = "0.1.0"
