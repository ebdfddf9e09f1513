"""subnet.env: what Docker (--bip, --mtu) and flannel's CNI plugin read, in flanneld's format."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import NamedTuple, TypeVar

from control.subnet.config import go_ip6_text, go_ip6net_text

log = logging.getLogger("pyflanneld.subnetenv")

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"

Network = TypeVar("Network", ipaddress.IPv4Network, ipaddress.IPv6Network)


class SubnetEnv(NamedTuple):
    """One family's lines are written when its network and subnet are both given: flanneld
    writes the IPv4 ones with EnableIPv4 and the IPv6 ones with EnableIPv6, and a lease has
    the subnet of each family the config enables. One MTU serves both, as in flanneld."""
    network: ipaddress.IPv4Network | None
    subnet: ipaddress.IPv4Network | None
    mtu: int
    ip_masq: bool
    ipv6_network: ipaddress.IPv6Network | None = None
    ipv6_subnet: ipaddress.IPv6Network | None = None

    def render(self) -> str:
        # flanneld's WriteSubnetFile, in its order. A subnet is written as the lease's first
        # usable address with its prefix length; IPv6 text as flannel's ip.IP6 prints it.
        lines = []
        if self.network is not None and self.subnet is not None:
            lines += [f"FLANNEL_NETWORK={self.network}",
                      f"FLANNEL_SUBNET={self.subnet.network_address + 1}/{self.subnet.prefixlen}"]
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            first = go_ip6_text(self.ipv6_subnet.network_address + 1)
            lines += [f"FLANNEL_IPV6_NETWORK={go_ip6net_text(self.ipv6_network)}",
                      f"FLANNEL_IPV6_SUBNET={first}/{self.ipv6_subnet.prefixlen}"]
        lines += [f"FLANNEL_MTU={self.mtu}",
                  f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}"]
        return "".join(line + "\n" for line in lines)


def write_subnet_env(path: str, env: SubnetEnv) -> None:
    """Write atomically, as flanneld does: into "."+name beside it, then rename over it."""
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", mode=0o755, exist_ok=True)
    temp = os.path.join(directory, "." + name)
    with open(temp, "w") as f:
        f.write(env.render())
    os.rename(temp, path)


def read_variables(path: str) -> dict[str, str]:
    """The KEY=VALUE lines of a subnet.env (quotes around a value dropped, as a shell that
    sources it would); raises OSError when it cannot be read."""
    variables = {}
    with open(path) as f:
        for line in f.read().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.lstrip().startswith("#"):
                variables[key.strip()] = value.strip().strip("\"'")
    return variables


class PreviousSubnets(NamedTuple):
    """The subnets a previous run wrote, masked (flanneld reads them back with Go's
    net.ParseCIDR): None for a family it did not write, or wrote unreadably."""
    ipv4: ipaddress.IPv4Network | None
    ipv6: ipaddress.IPv6Network | None


def read_previous_subnets(path: str) -> PreviousSubnets:
    """FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET of a previous run's subnet.env, for the lease to
    reuse (flanneld's ReadCIDRFromSubnetFile and ReadIP6CIDRFromSubnetFile); a file that is
    not there gives neither, as do one that cannot be read and a value that is no subnet of
    its family, which are logged."""
    try:
        variables = read_variables(path)
    except FileNotFoundError:
        return PreviousSubnets(None, None)
    except OSError as err:
        log.warning("cannot read the previous subnets from %s: %s", path, err)
        return PreviousSubnets(None, None)
    ipv4 = _subnet(path, variables, "FLANNEL_SUBNET", ipaddress.IPv4Network)
    ipv6 = _subnet(path, variables, "FLANNEL_IPV6_SUBNET", ipaddress.IPv6Network)
    return PreviousSubnets(ipv4, ipv6)


def _subnet(path: str, variables: dict[str, str], key: str,
            family: type[Network]) -> Network | None:
    value = variables.get(key)
    if value is None:
        return None
    try:
        if "/" not in value:  # Go's ParseCIDR needs the prefix length
            raise ValueError(value)
        return family(value, strict=False)
    except ValueError:
        log.warning("%s: %s=%s is not a subnet; ignoring it", path, key, value)
        return None
