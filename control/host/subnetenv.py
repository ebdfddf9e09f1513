"""subnet.env: what Docker (--bip, --mtu) and flannel's CNI plugin read, in flanneld's format."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import NamedTuple

log = logging.getLogger("pyflanneld.subnetenv")

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"


class SubnetEnv(NamedTuple):
    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Network
    mtu: int
    ip_masq: bool

    def render(self) -> str:
        # FLANNEL_SUBNET is the lease's first usable address with its prefix length.
        first = self.subnet.network_address + 1
        return (f"FLANNEL_NETWORK={self.network}\n"
                f"FLANNEL_SUBNET={first}/{self.subnet.prefixlen}\n"
                f"FLANNEL_MTU={self.mtu}\n"
                f"FLANNEL_IPMASQ={'true' if self.ip_masq else 'false'}\n")


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


def read_previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """The subnet a previous run wrote as FLANNEL_SUBNET, or None (no file, or unreadable)."""
    try:
        value = read_variables(path).get("FLANNEL_SUBNET")
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("cannot read the previous subnet from %s: %s", path, err)
        return None
    if value is None:
        return None
    try:
        return ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        log.warning("%s: FLANNEL_SUBNET=%s is not a subnet; ignoring it", path, value)
        return None
