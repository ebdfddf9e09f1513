"""Fixtures shared by the namespace tests. Prerequisites that are missing fail the test with the
reason; they never skip it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.etcd import EtcdServer
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
