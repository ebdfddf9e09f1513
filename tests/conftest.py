"""Fixtures shared by the namespace tests. Prerequisites that are missing fail the test with the
reason; they never skip it."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.cluster import Cluster, stop_all
from tests.etcd import EtcdServer
from tests.kubeapi import KubeApi
from tests.testbed import Testbed


def require_host_network_tools() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (namespace tests make network namespaces and TUN devices)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            missing.append(f"the '{tool}' command (make install installs it)")
    if missing:
        pytest.fail("missing: " + "; ".join(missing), pytrace=False)


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    """A fresh underlay for the module's tests; every namespace is deleted afterwards."""
    require_host_network_tools()
    with Testbed() as bed:
        yield bed


@pytest.fixture(scope="module")
def bed_and_etcd() -> Iterator[tuple[Testbed, EtcdServer]]:
    """A fresh underlay with a real etcd on it (both APIs) for the module's tests."""
    require_host_network_tools()
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            yield bed, etcd
        finally:
            etcd.stop()


CLUSTER_CIDR = "10.244.0.0/16"  # the controller manager's --cluster-cidr in the kube tests


@contextmanager
def control_plane(cluster_cidr: str) -> Iterator[tuple[Testbed, EtcdServer, KubeApi]]:
    """A Kubernetes control plane (tests/kubeapi.py) whose controller manager gives podCIDRs
    of `cluster_cidr` (one CIDR of each family for dual-stack), on the tests' etcd (its keys
    under a prefix of their own)."""
    require_host_network_tools()
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            api = KubeApi(bed, etcd, cluster_cidr=cluster_cidr)
            try:
                yield bed, etcd, api
            finally:
                api.stop()
        finally:
            etcd.stop()


@pytest.fixture(scope="module")
def kube() -> Iterator[tuple[Testbed, EtcdServer, KubeApi]]:
    """A Kubernetes control plane for the module."""
    with control_plane(CLUSTER_CIDR) as plane:
        yield plane


@pytest.fixture(scope="module", params=["v3", "v2"])
def shared(request: pytest.FixtureRequest) -> Iterator[tuple[Testbed, EtcdServer, str]]:
    require_host_network_tools()
    with Testbed() as bed:
        etcd = EtcdServer(bed)
        try:
            yield bed, etcd, request.param
        finally:
            etcd.stop()


@pytest.fixture
def cluster(shared: tuple[Testbed, EtcdServer, str], request: pytest.FixtureRequest
            ) -> Iterator[Cluster]:
    bed, etcd, api = shared
    cluster = Cluster(bed, etcd, api, "/" + re.sub(r"[^\w.-]", "-", request.node.name)
                      + "/network")
    try:
        yield cluster
    finally:
        stop_all(cluster.daemons)
