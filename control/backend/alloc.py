"""flannel's alloc backend: a lease and subnet.env, and nothing on the data path."""

from __future__ import annotations

import ipaddress

from control.host.interface import ExternalInterface
from control.subnet.lease import PeerLease, Subnets, encode_lease


class AllocBackend:
    kind = ""
    devices: tuple[str, ...] = ()

    def __init__(self, ext: ExternalInterface, public_ip: ipaddress.IPv4Address | None,
                 public_ipv6: ipaddress.IPv6Address | None) -> None:
        self._ext = ext
        self._public_ip = public_ip
        self._public_ipv6 = public_ipv6

    def prepare(self) -> None:
        """Nothing to make."""

    def lease_value(self) -> bytes:
        # flanneld's alloc writes no PublicIPv6; an IPv6-only host's is how it knows its lease.
        return encode_lease(self._public_ip,
                            public_ipv6=self._public_ipv6 if self._public_ip is None else None)

    def start(self, subnet: Subnets) -> int:
        return self._ext.mtu  # flanneld's alloc writes the external interface's

    def move(self, old: Subnets, new: Subnets) -> None:
        """Nothing addressed from the subnet."""

    def add_peer(self, subnet: Subnets, lease: PeerLease, old: PeerLease | None) -> bool:
        return True  # known, with nothing to route

    def remove_peer(self, subnet: Subnets, lease: PeerLease) -> None:
        """Nothing routed."""

    def prune(self, peers: dict[Subnets, PeerLease]) -> None:
        """Nothing routed."""

    def kept(self) -> dict[str, int]:
        return {}  # it forwards nothing

    def status(self) -> str:
        return "alloc"

    def leave(self) -> None:
        """Nothing kept for a next run but the kernel's own state, as flanneld leaves it."""

    def stop(self) -> None:
        """Nothing running."""
