"""The network config at `<prefix>/config`, parsed, defaulted and checked as flanneld does.

flanneld decodes the JSON with Go's encoding/json into a struct, then applies the rules of
flannel's pkg/subnet/config.go. What that means for the accepted inputs, and copied here:
- object keys match field names case-insensitively, unknown keys are ignored, and when a key
  repeats the last one wins;
- `null` leaves a plain field at its zero value, but the address types decode `null` as text and
  so reject it;
- SubnetLen is a Go uint: only a whole, non-negative JSON number fits;
- an address of 0.0.0.0 (or none) for SubnetMin/SubnetMax means "use the default";
- with a Backend object the type is its `Type` (lower-cased); without one it is udp.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_UDP_PORT = 8285
SERVED_BACKENDS = ("udp", "vxlan", "host-gw", "alloc")
MAX_VNI = (1 << 24) - 1  # a VXLAN network identifier has 24 bits


class ConfigError(ValueError):
    """The config cannot be used; the message says why, in flanneld's words where it has some."""


@dataclass(frozen=True)
class VxlanConfig:
    """flanneld v0.20.2's vxlan Backend keys (others, MTU and MacPrefix included, came later
    and are ignored as Go's decoder ignores unknown keys)."""
    vni: int = 1
    port: int = 0  # Backend.Port as given, a Go int: see dst_port for what the device gets
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False

    @property
    def dst_port(self) -> int:
        """The port flanneld's device gets: its netlink library sends uint16(Port) only when
        Port > 0, so 70000 is 4464, and 0 or a negative Port sends none (the kernel's default,
        8472, as does a Port whose low 16 bits are 0). 0 here means "the kernel's default"."""
        return self.port & 0xFFFF if self.port > 0 else 0


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend_type: str
    port: int  # the udp backend's Backend.Port
    vxlan: VxlanConfig | None = None  # the vxlan backend's keys

    def subnet_fits(self, subnet: ipaddress.IPv4Network) -> bool:
        """flanneld's isSubnetConfigCompat: right length and inside [SubnetMin, SubnetMax]."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def subnets(self) -> Iterator[ipaddress.IPv4Network]:
        """Every subnet from SubnetMin to SubnetMax, in order (lazily: a /8 cut into /30s has
        four million)."""
        size = 1 << (32 - self.subnet_len)
        for base in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield ipaddress.IPv4Network((base, self.subnet_len))


class _Object(list):
    """A JSON object as its (key, value) pairs in order; plain lists are JSON arrays."""


def _load(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_Object)
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid JSON: {err}") from None


def _fields(value: Any, where: str) -> dict[str, Any]:
    """A JSON object's members keyed by lower-cased name, the last repeat winning (Go's decoder)."""
    if not isinstance(value, _Object):
        raise ConfigError(f"cannot unmarshal {_json_kind(value)} into {where}")
    return {key.lower(): member for key, member in value}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, _Object) else "array"


def _literal_text(value: Any) -> str:
    """What flannel's ip types parse: the JSON literal with its quotes trimmed, so null is the
    text "null" and is refused like any other non-address."""
    return value if isinstance(value, str) else json.dumps(value)


def _cidr(value: Any, name: str) -> ipaddress.IPv4Network:
    text = _literal_text(value)
    try:
        if "/" not in text:  # Go's ParseCIDR needs the prefix length
            raise ValueError(text)
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{name}: invalid CIDR address: {text}") from None
    if net.version != 4:
        raise ConfigError(f"{name}: {text} is not an IPv4 network")
    return net


def _address(value: Any, name: str) -> ipaddress.IPv4Address:
    text = _literal_text(value)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: invalid IP address format: {text}") from None
    if address.version != 4:
        raise ConfigError(f"{name}: {text} is not an IPv4 address")
    return address


def _uint(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise ConfigError(f"{name}: cannot unmarshal {_json_kind(value)} {value!r} into uint")
    return value


def _bool(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: cannot unmarshal {_json_kind(value)} into bool")
    return value


def _backend(fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, the Backend's other fields) as flanneld's parseBackendType reads them: no Backend
    means udp; a Backend (even null or {}) without a Type has type "", which no one serves."""
    if "backend" not in fields:
        return "udp", {}
    if fields["backend"] is None:
        return "", {}
    fields = _fields(fields["backend"], "Backend (error decoding Backend property of config)")
    backend_type = fields.get("type")
    if backend_type is None:
        backend_type = ""
    elif not isinstance(backend_type, str):
        raise ConfigError("error decoding Backend property of config: Type must be a string")
    return backend_type.lower(), fields


def _int(value: Any, name: str, backend: str) -> int:
    """A Go int field of a backend's config struct: null leaves it alone (None here)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not -(1 << 63) <= value < 1 << 63):
        raise ConfigError(f"error decoding {backend} backend config: cannot unmarshal "
                          f"{_json_kind(value)} {value!r} into Go struct field {name} of type "
                          "int")
    return value


def _udp_port(fields: dict[str, Any]) -> int:
    port = _int(fields.get("port"), "Port", "UDP")
    if port is None:
        return DEFAULT_UDP_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"Backend.Port {port} is not a UDP port (1..65535)")
    return port


def _vxlan(fields: dict[str, Any]) -> VxlanConfig:
    """flanneld decodes the Backend object into {VNI, Port int; GBP, Learning, DirectRouting
    bool}. The kernel then refuses a VNI out of range when it makes the device, which is
    checked here instead so the log says which key is wrong; any Port is accepted, as flanneld
    accepts it (VxlanConfig.dst_port says what becomes of it)."""
    vni = _int(fields.get("vni"), "VNI", "VXLAN")
    port = _int(fields.get("port"), "Port", "VXLAN")
    try:
        flags = {name: _bool(fields.get(name.lower()), name, False)
                 for name in ("GBP", "Learning", "DirectRouting")}
    except ConfigError as err:
        raise ConfigError(f"error decoding VXLAN backend config: {err}") from None
    vni = 1 if vni is None else vni
    if not 0 <= vni <= MAX_VNI:
        raise ConfigError(f"Backend.VNI {vni} is out of range (0..{MAX_VNI})")
    return VxlanConfig(vni, port or 0, flags["GBP"], flags["Learning"], flags["DirectRouting"])


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and check the config as flanneld does; raise ConfigError saying what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ConfigError("invalid JSON: not UTF-8") from None
    fields = _fields(_load(text), "the network config")

    if not _bool(fields.get("enableipv4"), "EnableIPv4", True):
        raise ConfigError("EnableIPv4 is false: the udp backend carries IPv4 only")
    if _bool(fields.get("enableipv6"), "EnableIPv6", False):
        raise ConfigError("EnableIPv6 is set: the udp backend carries IPv4 only")

    # Missing, or 0.0.0.0/0, is Go's empty IP4Net.
    network = _cidr(fields["network"], "Network") if "network" in fields else None
    if network is None or network == ipaddress.IPv4Network("0.0.0.0/0"):
        raise ConfigError("please define a correct Network parameter in the flannel config")

    subnet_len = _uint(fields.get("subnetlen"), "SubnetLen")
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError("SubnetLen must be less than /31")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif network.prefixlen > 28:
        raise ConfigError("network is too small. Minimum useful network prefix is /28")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    unset = ipaddress.IPv4Address(0)
    subnet_min = _address(fields["subnetmin"], "SubnetMin") if "subnetmin" in fields else unset
    if subnet_min == unset:
        subnet_min = network.network_address + size
    elif subnet_min not in network:
        raise ConfigError("SubnetMin is not in the range of the Network")
    subnet_max = _address(fields["subnetmax"], "SubnetMax") if "subnetmax" in fields else unset
    if subnet_max == unset:
        subnet_max = ipaddress.IPv4Address(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError("SubnetMax is not in the range of the Network")

    if int(subnet_min) % size:
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) % size:
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {subnet_max}")

    backend_type, backend = _backend(fields)
    if backend_type not in SERVED_BACKENDS:
        raise ConfigError(f"backend type {backend_type!r} is not served: pyflanneld serves "
                          + ", ".join(SERVED_BACKENDS))
    port = _udp_port(backend) if backend_type == "udp" else DEFAULT_UDP_PORT
    vxlan = _vxlan(backend) if backend_type == "vxlan" else None
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend_type, port, vxlan)
