"""The network config at `<prefix>/config`, parsed, defaulted and checked as flanneld does.

flanneld v0.20.2 decodes the JSON with Go's encoding/json into a struct (subnet.ParseConfig),
then applies subnet.CheckNetworkConfig: the IPv4 checks when EnableIPv4, then the IPv6 ones when
EnableIPv6; main then refuses a config with neither family. What that means for the accepted
inputs, and copied here:
- object keys match field names case-insensitively, unknown keys are ignored, and when a key
  repeats the last one wins;
- every key is decoded, whatever the Enable flags say: a bad IPv6Network is refused in an
  IPv4-only config too;
- `null` leaves a plain field at its zero value, but the address types decode `null` as text and
  so reject it; IPv6SubnetMin/Max are pointers in Go, so for them `null` is "not set";
- SubnetLen and IPv6SubnetLen are Go uints: only a whole, non-negative JSON number fits;
- an address of 0.0.0.0 (or none) for SubnetMin/SubnetMax, and of :: (or none, or null) for
  IPv6SubnetMin/Max, means "use the default";
- Networks and IPv6Networks (lists of CIDRs) are decoded but not checked;
- with a Backend object the type is its `Type` (lower-cased); without one it is udp.
Type errors keep Go's words ("json: cannot unmarshal string into Go struct field Config.SubnetLen
of type uint"); where flannel's own parsers give a message without the key ("invalid CIDR
address: x"), the key is put in front of it.

In kube mode flanneld only decodes (no checks, no defaults); pyflanneld checks in both modes.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
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
    """The config as flanneld uses it. A family that is off has flanneld's zero values: with
    EnableIPv4 false, network is None, subnet_len 0 and subnet_min/subnet_max 0.0.0.0; with
    EnableIPv6 false, ipv6_network, ipv6_subnet_min and ipv6_subnet_max are None and
    ipv6_subnet_len 0. The subnet methods of a family that is off fit and list nothing."""
    network: ipaddress.IPv4Network | None
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend_type: str
    port: int  # the udp backend's Backend.Port
    vxlan: VxlanConfig | None = None  # the vxlan backend's keys
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: ipaddress.IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Address | None = None
    ipv6_subnet_max: ipaddress.IPv6Address | None = None
    # Networks and IPv6Networks as given (flanneld checks neither). Where they are not empty,
    # flanneld's GetFlannelNetwork/GetFlannelIPv6Network take element 0 in place of
    # Network/IPv6Network for the backends' routes and the iptables rules (never for leases or
    # subnet.env).
    networks: tuple[ipaddress.IPv4Network, ...] = ()
    ipv6_networks: tuple[ipaddress.IPv6Network, ...] = ()

    def subnet_fits(self, subnet: ipaddress.IPv4Network) -> bool:
        """flanneld's isSubnetConfigCompat: right length and inside [SubnetMin, SubnetMax]."""
        return (self.enable_ipv4 and subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def subnets(self) -> Iterator[ipaddress.IPv4Network]:
        """Every subnet from SubnetMin to SubnetMax, in order (lazily: a /8 cut into /30s has
        four million)."""
        if not self.enable_ipv4:
            return
        size = 1 << (32 - self.subnet_len)
        for base in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield ipaddress.IPv4Network((base, self.subnet_len))

    def ipv6_subnet_fits(self, subnet: ipaddress.IPv6Network | None) -> bool:
        """flanneld's isIPv6SubnetConfigCompat, None being a lease without an IPv6 part: with
        EnableIPv6 false only None fits; with it, the right length inside [IPv6SubnetMin,
        IPv6SubnetMax]."""
        if self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return subnet is None
        return (subnet is not None and subnet.prefixlen == self.ipv6_subnet_len
                and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max)

    def ipv6_subnets(self) -> Iterator[ipaddress.IPv6Network]:
        """Every IPv6 subnet from IPv6SubnetMin to IPv6SubnetMax, in order (lazily: a /48 cut
        into /64s has 65536, a /64 into /126s 2^62)."""
        if self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return
        size = 1 << (128 - self.ipv6_subnet_len)
        for base in range(int(self.ipv6_subnet_min), int(self.ipv6_subnet_max) + 1, size):
            yield ipaddress.IPv6Network((base, self.ipv6_subnet_len))


def go_ip6_text(address: ipaddress.IPv6Address) -> str:
    """An IPv6 address as flannel's ip.IP6 prints it (IPv6 subnets in lease keys, subnet.env,
    error messages): Go's net.IP text, which is Python's except that an IPv4-mapped address
    (::ffff:a.b.c.d) is dotted; and ip.IP6 holds a big integer whose 4-byte values (2^24 to
    2^32 - 1) become a 4-byte, so dotted, net.IP."""
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if 1 << 24 <= int(address) < 1 << 32:
        return str(ipaddress.IPv4Address(int(address)))
    return str(address)


def go_ip6net_text(network: ipaddress.IPv6Network) -> str:
    """An IPv6 network as flannel's ip.IP6Net prints it: go_ip6_text, "/", the length."""
    return f"{go_ip6_text(network.network_address)}/{network.prefixlen}"


class _Object(list):
    """A JSON object as its (key, value) pairs in order; plain lists are JSON arrays."""


class _Int(int):
    """A JSON integer that keeps its text: Go's errors quote a number as written."""
    literal: str


class _Float(float):
    literal: str


def _parse_int(text: str) -> _Int:
    number = _Int(text)
    number.literal = text
    return number


def _parse_float(text: str) -> _Float:
    number = _Float(text)
    number.literal = text
    return number


def _load(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_Object, parse_int=_parse_int,
                          parse_float=_parse_float)
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


def _type_error(value: Any, field: str, go_type: str, struct: str = "Config") -> ConfigError:
    """Go's UnmarshalTypeError for a field of a struct (flannel's Config; "" for a backend's
    anonymous one): a number that does not fit an integer field is quoted, one given to
    another type is not."""
    kind = _json_kind(value)
    if kind == "number" and go_type == "uint":
        kind = f"number {_literal_text(value)}"
    return _SavedError(f"json: cannot unmarshal {kind} into Go struct field {struct}.{field} "
                       f"of type {go_type}")


def _literal_text(value: Any) -> str:
    """What flannel's ip types parse: the JSON literal with its quotes trimmed, so null is the
    text "null" and is refused like any other non-address."""
    if isinstance(value, str):
        return value
    return getattr(value, "literal", None) or json.dumps(value)


def _cidr(value: Any, name: str, version: int) -> Any:
    """A Network or IPv6Network (masked, as Go's net.ParseCIDR gives it), of `version`. Go's
    other family would be a panic in flanneld (an IPv6 Network) or an unmasked IPv4-mapped
    network that no lease can be in (an IPv4 IPv6Network): both are refused here."""
    text = _literal_text(value)
    try:
        if "/" not in text or "%" in text:  # Go's ParseCIDR needs the length, takes no zone
            raise ValueError(text)
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{name}: invalid CIDR address: {text}") from None
    if net.version != version:
        raise ConfigError(f"{name}: {text} is not an IPv{version} network")
    return net


def _cidrs(value: Any, name: str, version: int) -> tuple[Any, ...]:
    """Networks or IPv6Networks: null is none, anything but an array Go's type error."""
    if value is None:
        return ()
    if not isinstance(value, list) or isinstance(value, _Object):
        raise _type_error(value, name, f"[]ip.IP{version}Net")
    return tuple(_cidr(item, name, version) for item in value)


def _address(value: Any, name: str) -> ipaddress.IPv4Address:
    text = _literal_text(value)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: Invalid IP address format: {text}") from None
    if address.version != 4:
        raise ConfigError(f"{name}: {text} is not an IPv4 address")
    return address


def _ipv6_address(value: Any, name: str) -> ipaddress.IPv6Address | None:
    """IPv6SubnetMin/Max, a pointer in Go: null (like ::) is "not set". Go's net.ParseIP takes
    IPv4 text too, as the IPv4-mapped address, which no IPv6Network holds but ::ffff:0:0/96."""
    if value is None:
        return None
    text = _literal_text(value)
    try:
        if "%" in text:  # Python takes a zone (fe80::1%eth0); Go's ParseIP does not
            raise ValueError(text)
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: Invalid IP address format: {text}") from None
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address((0xFFFF << 32) | int(address))
    return address if int(address) else None


def _uint(value: Any, name: str) -> int:
    if value is None:
        return 0
    if (not isinstance(value, _Int) or not value.literal.isdigit()
            or value >= 1 << 64):  # Go's strconv.ParseUint: no sign, 64 bits
        raise _type_error(value, name, "uint")
    return int(value)


def _bool(value: Any, name: str, default: bool, struct: str = "Config") -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(value, name, "bool", struct)
    return value


class _SavedError(ConfigError):
    """A type error: Go's decoder notes the first and goes on, and reports it only when no
    flannel parser (an address, a CIDR) failed after it."""


_KEEP = object()  # null given to a Go bool or uint: the field keeps what it had


def _plain(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: _KEEP if value is None else decode(value)


# Config's fields by lower-cased name, as Go's decoder matches them, and how each decodes.
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "enableipv4": _plain(lambda value: _bool(value, "EnableIPv4", True)),
    "enableipv6": _plain(lambda value: _bool(value, "EnableIPv6", False)),
    "network": lambda value: _cidr(value, "Network", 4),
    "ipv6network": lambda value: _cidr(value, "IPv6Network", 6),
    "networks": lambda value: _cidrs(value, "Networks", 4),
    "ipv6networks": lambda value: _cidrs(value, "IPv6Networks", 6),
    "subnetmin": lambda value: _address(value, "SubnetMin"),
    "subnetmax": lambda value: _address(value, "SubnetMax"),
    "ipv6subnetmin": lambda value: _ipv6_address(value, "IPv6SubnetMin"),
    "ipv6subnetmax": lambda value: _ipv6_address(value, "IPv6SubnetMax"),
    "subnetlen": _plain(lambda value: _uint(value, "SubnetLen")),
    "ipv6subnetlen": _plain(lambda value: _uint(value, "IPv6SubnetLen")),
    "backend": lambda value: value,  # a json.RawMessage: whatever it holds, decoded later
}


def _decode(pairs: _Object) -> dict[str, Any]:
    """The config object's fields as Go's decoder fills flannel's Config: member by member in
    the document's order (so a repeated key's every value is decoded, and the last one
    stays); a flannel parser's error stops it at once, a type error is reported at the end."""
    decoded: dict[str, Any] = {}
    saved: _SavedError | None = None
    for key, value in pairs:
        name = key.lower()
        if name not in _DECODERS:
            continue
        try:
            result = _DECODERS[name](value)
        except _SavedError as err:
            saved = saved or err
            continue
        if result is not _KEEP:
            decoded[name] = result
    if saved is not None:
        raise saved
    return decoded


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


def _int(value: Any, name: str, backend: str) -> int | None:
    """A Go int field of a backend's config struct: null leaves it alone (None here)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not -(1 << 63) <= value < 1 << 63):
        raise ConfigError(f"error decoding {backend} backend config: cannot unmarshal "
                          f"{_json_kind(value)} {value!r} into Go struct field {name} of type "
                          "int")
    return None if value is None else int(value)


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
        flags = {name: _bool(fields.get(name.lower()), name, False, "")
                 for name in ("GBP", "Learning", "DirectRouting")}
    except ConfigError as err:
        raise ConfigError(f"error decoding VXLAN backend config: {err}") from None
    vni = 1 if vni is None else vni
    if not 0 <= vni <= MAX_VNI:
        raise ConfigError(f"Backend.VNI {vni} is out of range (0..{MAX_VNI})")
    return VxlanConfig(vni, port or 0, flags["GBP"], flags["Learning"], flags["DirectRouting"])


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and check the config as flanneld does, in its order (decoding, the IPv4 checks,
    the IPv6 checks, the families, the backend); raise ConfigError saying what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ConfigError("invalid JSON: not UTF-8") from None
    pairs = _load(text)
    if not isinstance(pairs, _Object):
        raise ConfigError(f"cannot unmarshal {_json_kind(pairs)} into the network config")

    # subnet.ParseConfig. Missing is Go's empty IP4Net/IP6Net (as are 0.0.0.0/0 and ::/0,
    # which the checks treat alike) and a 0 or unset SubnetMin/Max.
    decoded = _decode(pairs)
    enable_ipv4: bool = decoded.get("enableipv4", True)
    enable_ipv6: bool = decoded.get("enableipv6", False)
    network: ipaddress.IPv4Network | None = decoded.get("network")
    ipv6_network: ipaddress.IPv6Network | None = decoded.get("ipv6network")
    unset = ipaddress.IPv4Address(0)
    subnet_min: ipaddress.IPv4Address = decoded.get("subnetmin", unset)
    subnet_max: ipaddress.IPv4Address = decoded.get("subnetmax", unset)
    ipv6_subnet_min: ipaddress.IPv6Address | None = decoded.get("ipv6subnetmin")
    ipv6_subnet_max: ipaddress.IPv6Address | None = decoded.get("ipv6subnetmax")
    subnet_len: int = decoded.get("subnetlen", 0)
    ipv6_subnet_len: int = decoded.get("ipv6subnetlen", 0)
    networks: tuple[ipaddress.IPv4Network, ...] = decoded.get("networks", ())
    ipv6_networks: tuple[ipaddress.IPv6Network, ...] = decoded.get("ipv6networks", ())
    backend_type, backend = _backend(decoded)

    # subnet.CheckNetworkConfig, with the defaults it fills in.
    if enable_ipv4:
        subnet_len, subnet_min, subnet_max = _check_ipv4(network, subnet_len, subnet_min,
                                                         subnet_max)
    else:
        network, subnet_len, subnet_min, subnet_max = None, 0, unset, unset
    if enable_ipv6:
        ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max = _check_ipv6(
            ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max)
    else:
        ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max = None, 0, None, None
    if not enable_ipv4 and not enable_ipv6:
        # flanneld's main (ipmatch.GetIPFamily) logs this and exits 1; here the daemon logs it
        # and reads the config again, as for any config problem.
        raise ConfigError("none defined stack: EnableIPv4 and EnableIPv6 are both false")

    if backend_type not in SERVED_BACKENDS:
        raise ConfigError(f"backend type {backend_type!r} is not served: pyflanneld serves "
                          + ", ".join(SERVED_BACKENDS))
    port = _udp_port(backend) if backend_type == "udp" else DEFAULT_UDP_PORT
    vxlan = _vxlan(backend) if backend_type == "vxlan" else None
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend_type, port, vxlan,
                         enable_ipv4, enable_ipv6, ipv6_network, ipv6_subnet_len,
                         ipv6_subnet_min, ipv6_subnet_max, networks, ipv6_networks)


def _check_ipv4(network: ipaddress.IPv4Network | None, subnet_len: int,
                subnet_min: ipaddress.IPv4Address, subnet_max: ipaddress.IPv4Address
                ) -> tuple[int, ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """CheckNetworkConfig's IPv4 part: (SubnetLen, SubnetMin, SubnetMax) with the defaults."""
    if network is None or network.prefixlen == 0:
        raise ConfigError("please define a correct Network parameter in the flannel config")
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
    if not int(subnet_min):
        subnet_min = network.network_address + size
    elif subnet_min not in network:
        raise ConfigError("SubnetMin is not in the range of the Network")
    if not int(subnet_max):
        subnet_max = ipaddress.IPv4Address(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError("SubnetMax is not in the range of the Network")

    if int(subnet_min) % size:
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) % size:
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    return subnet_len, subnet_min, subnet_max


def _check_ipv6(network: ipaddress.IPv6Network | None, subnet_len: int,
                subnet_min: ipaddress.IPv6Address | None,
                subnet_max: ipaddress.IPv6Address | None
                ) -> tuple[int, ipaddress.IPv6Address, ipaddress.IPv6Address]:
    """CheckNetworkConfig's IPv6 part: (IPv6SubnetLen, IPv6SubnetMin, IPv6SubnetMax) with the
    defaults; the IPv4 part's rules at 128 bits, with flanneld's own words for each."""
    if network is None or network.prefixlen == 0:
        raise ConfigError("please define a correct IPv6Network parameter in the flannel config")
    if subnet_len > 0:
        if subnet_len > 126:
            raise ConfigError("SubnetLen must be less than /127")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    elif network.prefixlen > 124:
        raise ConfigError("IPv6Network is too small. Minimum useful network prefix is /124")
    elif network.prefixlen <= 62:
        subnet_len = 64
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (128 - subnet_len)
    if subnet_min is None:
        subnet_min = network.network_address + size
    elif subnet_min not in network:
        raise ConfigError("IPv6SubnetMin is not in the range of the IPv6Network")
    if subnet_max is None:
        subnet_max = ipaddress.IPv6Address(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError("IPv6SubnetMax is not in the range of the IPv6Network")

    if int(subnet_min) % size:
        raise ConfigError("IPv6SubnetMin is not on a SubnetLen boundary: "
                          + go_ip6_text(subnet_min))
    if int(subnet_max) % size:
        raise ConfigError("IPv6SubnetMax is not on a SubnetLen boundary: "
                          + go_ip6_text(subnet_max))
    return subnet_len, subnet_min, subnet_max
