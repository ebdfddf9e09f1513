"""The regimes the benchmark runs every path in: what the underlay between the two hosts is like.

- shaped-100mbit: tc tbf at 100 Mbit/s on each host's underlay egress, the paper's 100 Mbit NIC.
- unshaped: plain veths, this machine's ceiling. veths pass 64 KB GSO frames, which flatters
  every path whose sender leaves segmentation to the device.
- wire: underlay veths with TSO and GSO off and GRO on, at both ends of every underlay link, so
  1500-byte frames cross it as they cross a NIC's wire and the receiver merges them back.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.testbed import Host, sh


@dataclass(frozen=True)
class Regime:
    name: str
    rate: str | None = None  # tc tbf rate on each host's underlay egress
    wire: bool = False  # TSO, GSO off and GRO on at both ends of each underlay veth
    udp_search: bool = True  # 64-byte UDP: a shaped link only measures the shaper


REGIMES = {regime.name: regime for regime in [
    Regime("shaped-100mbit", rate="100mbit", udp_search=False),
    Regime("unshaped"),
    Regime("wire", wire=True),
]}
WIRE_FEATURES = {"tcp-segmentation-offload": "off", "generic-segmentation-offload": "off",
                 "generic-receive-offload": "on"}
# ethtool -k's names for the features above, to ethtool -K's.
FEATURE_FLAGS = {"tcp-segmentation-offload": "tso", "generic-segmentation-offload": "gso",
                 "generic-receive-offload": "gro"}


@dataclass(frozen=True)
class Link:
    """One end of an underlay veth: an interface in a namespace."""

    netns: str
    name: str

    def features(self) -> dict[str, str]:
        out = sh("ip", "netns", "exec", self.netns, "ethtool", "-k", self.name).stdout
        found = {}
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key in WIRE_FEATURES:
                found[key] = value.split()[0]
        return found

    def set_features(self, features: dict[str, str]) -> None:
        flags = [word for key, value in features.items() for word in (FEATURE_FLAGS[key], value)]
        sh("ip", "netns", "exec", self.netns, "ethtool", "-K", self.name, *flags)


def underlay_links(hosts: list[Host], underlay_netns: str) -> list[Link]:
    """Both ends of each host's underlay veth: its eth0 and the bridge port it is paired with."""
    links = []
    for host in hosts:
        peer_index = sh("ip", "-n", host.netns, "-o", "link", "show", "eth0").stdout \
            .split(":")[1].split("@if")[1]
        port = next(line.split(":")[1].strip().split("@")[0] for line in
                    sh("ip", "-n", underlay_netns, "-o", "link").stdout.splitlines()
                    if line.split(":")[0] == peer_index)
        links += [Link(host.netns, "eth0"), Link(underlay_netns, port)]
    return links


class Underlay:
    """Puts the hosts' underlay into one regime at a time; leave() restores what it found."""

    def __init__(self, hosts: list[Host], underlay_netns: str) -> None:
        self.hosts = hosts
        self.links = underlay_links(hosts, underlay_netns)
        self.saved: dict[Link, dict[str, str]] = {}

    def enter(self, regime: Regime) -> None:
        self.leave()
        if regime.rate:
            for host in self.hosts:
                host.run("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", regime.rate,
                         "burst", "64kb", "latency", "50ms")
        if regime.wire:
            for link in self.links:
                self.saved[link] = link.features()
                link.set_features(WIRE_FEATURES)

    def leave(self) -> None:
        for host in self.hosts:
            host.run("tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        for link, features in self.saved.items():
            link.set_features(features)
        self.saved.clear()
