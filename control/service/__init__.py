"""The pyflanneld command: flags, the daemon's life, its HTTP pages and metrics, systemd's notify
protocol and fd store."""
