"""flannel's alloc backend: a lease and subnet.env, and nothing on the data path."""

from __future__ import annotations

import ipaddress

from control.host.interface import ExternalInterface
from control.subnet.lease import PeerLease, encode_lease


class AllocBackend:
    kind = ""
    device = None

    def __init__(self, ext: ExternalInterface, public_ip: ipaddress.IPv4Address) -> None:
        self._ext = ext
        self._public_ip = public_ip

    def prepare(self) -> None:
        """Nothing to make."""

    def lease_value(self) -> bytes:
        return encode_lease(self._public_ip)

    def start(self, subnet: ipaddress.IPv4Network) -> int:
        return self._ext.mtu  # flanneld's alloc writes the external interface's

    def move(self, old: ipaddress.IPv4Network, new: ipaddress.IPv4Network) -> None:
        """Nothing addressed from the subnet."""

    def add_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease,
                 old: PeerLease | None) -> bool:
        return True  # known, with nothing to route

    def remove_peer(self, subnet: ipaddress.IPv4Network, lease: PeerLease) -> None:
        """Nothing routed."""

    def prune(self, peers: dict[ipaddress.IPv4Network, PeerLease]) -> None:
        """Nothing routed."""

    def kept(self) -> dict[str, int]:
        return {}  # it forwards nothing

    def status(self) -> str:
        return "alloc"

    def leave(self) -> None:
        """Nothing kept for a next run but the kernel's own state, as flanneld leaves it."""

    def stop(self) -> None:
        """Nothing running."""
