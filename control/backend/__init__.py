"""Backends: one interface (common.py), chosen by Backend.Type (manager.py): udp with its fast
path, vxlan, host-gw and alloc (flannel's pkg/backend)."""
