"""Prompt start with an etcd endpoint down, on both APIs: pyflanneld asks every endpoint at once
and talks to the first that answers, so the first being down (refusing, or not answering at all)
costs no client timeout. Only generous bounds are asserted here; the figures are printed
(`pytest -s`) and kept in perf/SCALE.md."""

from __future__ import annotations

import time

import pytest

from tests.cluster import Cluster

BOUND_SECONDS = 2.0
SILENT = "198.18.0.250"  # an underlay address no host has: a connection there hears nothing


@pytest.mark.parametrize("down", ["none", "refusing", "silent"])
def test_the_lease_is_held_promptly_whichever_endpoint_is_down(cluster: Cluster,
                                                               down: str) -> None:
    live = cluster.etcd.endpoint
    scheme, _, port = live.rpartition(":")
    dead = {"none": [], "refusing": [f"{scheme}:{int(port) + 7}"],
            "silent": [f"http://{SILENT}:{port}"]}[down]
    cluster.config({"Network": "10.244.0.0/16"})
    daemon = cluster.daemon("--etcd-endpoints", ",".join([*dead, live]), start=False)
    started = time.monotonic()
    daemon.start()
    daemon.wait_subnet(timeout=30)
    took = time.monotonic() - started
    print(f"\n{cluster.api}, first endpoint {down}: lease held and subnet.env written "
          f"{took:.2f} s after start")
    assert took <= BOUND_SECONDS, daemon.log()[-3000:]
