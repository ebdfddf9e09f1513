"""pyflannel's control plane: config, etcd leases, the watch, host setup, the pyflanneld command."""
