"""Separate programs with small imports: the `flannel` CNI plugin and `pyflannel-docker-opts`.
This package imports nothing, so that each program loads only what it needs."""
