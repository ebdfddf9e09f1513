"""Subnet managers: the network config, the lease policy and the watch, written once against
one storage interface (registry.py), with etcd's v3 and v2 APIs behind it (flannel's pkg/subnet)."""
