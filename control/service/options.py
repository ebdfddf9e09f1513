"""pyflanneld's flags: flanneld's, also as FLANNELD_* variables, parsed into Options.

Flags are spelled as flanneld spells them, with one or two dashes (`-iface=eth0`,
`--iface eth0`). A flag given on the command line wins over its environment variable, as with
flanneld. A bad flag or value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

from control.host.subnetenv import DEFAULT_SUBNET_FILE
from fastpath import DEFAULT_BATCH
from fastpath.udp_tc import KERNEL_MODES, RX_VXLAN_DEVICE, RX_VXLAN_PORT

VERSION = "0.1.0"
FLANNEL_COMPAT = "v0.20.2"
ENV_PREFIX = "FLANNELD_"
DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
DEFAULT_PREFIX = "/coreos.com/network"
SUBNET_TTL = 24 * 60 * 60  # flanneld's subnetTTL
DEFAULT_ETCD_PORT = 2379
KUBE_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
KUBE_NET_CONFIG = "/etc/kube-flannel/net-conf.json"


# NamedTuples, not dataclasses: a restart reads its flags before anything else, and making
# dataclasses costs it 5 ms (inspect's import and the generated methods).
class Endpoint(NamedTuple):
    scheme: str
    host: str
    port: int


class Options(NamedTuple):
    etcd_endpoints: list[Endpoint]
    etcd_prefix: str
    etcd_keyfile: str | None
    etcd_certfile: str | None
    etcd_cafile: str | None
    etcd_username: str | None
    etcd_password: str | None
    etcd_api: str
    iface: list[str]
    iface_regex: list[str]
    public_ip: ipaddress.IPv4Address | None
    public_ipv6: ipaddress.IPv6Address | None
    subnet_file: str
    subnet_lease_renew_margin: float  # minutes
    subnet_lease_ttl: int  # seconds
    ip_masq: bool
    iptables_resync: int
    iptables_forward_rules: bool
    healthz_ip: str
    healthz_port: int
    metrics_ip: str
    metrics_port: int
    kube_subnet_mgr: bool
    kube_api_url: str | None
    kubeconfig_file: str | None
    kube_annotation_prefix: str
    net_config_path: str
    set_node_network_unavailable: bool
    fastpath_batch: int
    fastpath_offload: bool
    fastpath_udp_coalesce: bool
    fastpath_nice: int
    fastpath_kernel: str
    fastpath_verify_source: bool
    fastpath_whole_superpackets: bool
    fastpath_vxlan_receive: bool
    fastpath_plain_superpackets: bool
    fastpath_pin_dir: str | None
    v: int

    @property
    def fastpath_levers(self) -> dict[str, Any]:
        """The fast path's switchable levers (FastPath's keyword arguments), from the flags."""
        return {"batch": self.fastpath_batch, "offload": self.fastpath_offload,
                "udp_coalesce": self.fastpath_udp_coalesce, "nice": self.fastpath_nice,
                "kernel": self.fastpath_kernel, "verify_source": self.fastpath_verify_source,
                "whole_superpackets": self.fastpath_whole_superpackets,
                "vxlan_receiver": RX_VXLAN_DEVICE if self.fastpath_vxlan_receive else "",
                "plain_superpackets": self.fastpath_plain_superpackets}


def _endpoints(text: str) -> list[Endpoint]:
    endpoints = []
    for url in text.split(","):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        endpoints.append(Endpoint(parts.scheme, parts.hostname, parts.port or DEFAULT_ETCD_PORT))
    if len({e.scheme for e in endpoints}) > 1:
        raise ValueError("mixes http and https endpoints")
    return endpoints


def _go_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return convert


def _bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is not in {low:g}..{high:g}")
        return value
    return convert


def _ipv4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def _ipv6(text: str) -> ipaddress.IPv6Address:
    """An IPv6 address as Go's net.ParseIP reads one (no %zone), and not an IPv4 one written
    as IPv6 (::ffff:a.b.c.d), which Go takes for IPv4."""
    address = ipaddress.IPv6Address(text)
    if address.scope_id is not None or address.ipv4_mapped is not None:
        raise ValueError(f"{text!r} is not a plain IPv6 address")
    return address


def _api(text: str) -> str:
    if text not in ("v3", "v2"):
        raise ValueError(f"{text!r} is neither v3 nor v2")
    return text


class Flag(NamedTuple):
    name: str
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    repeat: bool = False
    boolean: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


FLAGS = [
    Flag("etcd-endpoints", "a comma-delimited list of etcd endpoints", _endpoints,
         _endpoints(DEFAULT_ENDPOINTS)),
    Flag("etcd-prefix", "etcd prefix", default=DEFAULT_PREFIX),
    Flag("etcd-keyfile", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", "username for BasicAuth to etcd"),
    Flag("etcd-password", "password for BasicAuth to etcd"),
    Flag("etcd-api", "etcd API to use: v3 (flanneld v0.18+) or v2 (flanneld v0.17 and older)",
         _api, "v3"),
    Flag("iface", "interface to use (IP or name) for inter-host communication; repeatable",
         repeat=True, default=[]),
    Flag("iface-regex", "regex of the IP or name of the interface to use; repeatable",
         repeat=True, default=[]),
    Flag("public-ip", "IP accessible by other nodes for inter-host communication", _ipv4),
    Flag("public-ipv6", "IPv6 accessible by other nodes for inter-host communication", _ipv6),
    Flag("subnet-file", "filename where env variables (subnet, MTU, ...) will be written to",
         default=DEFAULT_SUBNET_FILE),
    Flag("subnet-lease-renew-margin", "subnet lease renewal margin, in minutes",
         _bounded(float, 1e-3, SUBNET_TTL / 60), 60.0),
    Flag("subnet-lease-ttl", "lease TTL in seconds (pyflannel; flanneld's is fixed at 24h)",
         _bounded(int, 1, 10 * SUBNET_TTL), SUBNET_TTL),
    Flag("ip-masq", "setup IP masquerade rule for traffic destined outside of overlay network",
         _go_bool, False, boolean=True),
    Flag("iptables-resync", "resync period for iptables rules, in seconds",
         _bounded(int, 1, 86400), 5),
    Flag("iptables-forward-rules", "add default accept rules to the FORWARD chain",
         _go_bool, True, boolean=True),
    Flag("healthz-ip", "the IP address for healthz server to listen", default="0.0.0.0"),
    Flag("healthz-port", "the port for healthz server to listen (0 to disable)",
         _bounded(int, 0, 65535), 0),
    Flag("metrics-ip", "the IP address for the metrics server to listen (pyflannel)",
         default="0.0.0.0"),
    Flag("metrics-port", "the port for the Prometheus metrics server, GET /metrics (pyflannel; "
         "0 to disable)", _bounded(int, 0, 65535), 0),
    Flag("kube-subnet-mgr", "contact the Kubernetes API for subnet assignment instead of etcd",
         _go_bool, False, boolean=True),
    Flag("kube-api-url", "Kubernetes API server URL. Does not need to be specified if flannel is "
         "running in a pod"),
    Flag("kubeconfig-file", "kubeconfig file location. Does not need to be specified if flannel "
         "is running in a pod"),
    Flag("kube-annotation-prefix", "Kubernetes annotation prefix. Can contain single slash "
         "\"/\", otherwise it will be appended at the end", default=KUBE_ANNOTATION_PREFIX),
    Flag("net-config-path", "path to the network configuration file (with --kube-subnet-mgr)",
         default=KUBE_NET_CONFIG),
    Flag("set-node-network-unavailable", "set NetworkUnavailable after ready (with "
         "--kube-subnet-mgr)", _go_bool, True, boolean=True),
    Flag("fastpath-batch", "packets moved per wake-up by the fast path, at most 16 with offloads "
         "(each may be a 64 KiB super-packet); 1 is per-packet (pyflannel)", _bounded(int, 1, 1024),
         DEFAULT_BATCH),
    Flag("fastpath-offload", "TUN offloads: TCP super-packets cut into UDP GSO sends, UDP GRO "
         "receives merged into one TUN write (pyflannel; the wire format is unchanged)",
         _go_bool, True, boolean=True),
    Flag("fastpath-udp-coalesce", "with offloads, merge received UDP datagrams of one flow "
         "into one TUN write that the kernel splits again (Linux 6.2+; pyflannel)",
         _go_bool, True, boolean=True),
    Flag("fastpath-nice", "nice value of the fast path's packet threads, -20..19: below 0 they "
         "run ahead of the applications they carry for, as the kernel's forwarding does "
         "(pyflannel)", _bounded(int, -20, 19), -10),
    Flag("fastpath-kernel", "on: carry the common case in the kernel with two tc-BPF programs "
         "(encapsulate, decapsulate), the rest still through the loops, safe with any peer; "
         "off: the loops alone (pyflannel)", _one_of(KERNEL_MODES), "on"),
    Flag("fastpath-verify-source", "deliver a received packet only when its source lies in "
         "the subnet leased to the host that sent the datagram; false where hosts reach each "
         "other through NAT (pyflannel)", _go_bool, True, boolean=True),
    Flag("fastpath-whole-superpackets", "with the kernel path on a veth underlay, send TCP "
         "super-packets whole, as kernel VXLAN does, to the peers that say (by a hello every "
         "few seconds) they take them: pyflanneld with offloads, never flanneld (pyflannel)",
         _go_bool, True, boolean=True),
    Flag("fastpath-vxlan-receive", "with the kernel path on a veth underlay, have the kernel's "
         f"VXLAN receive take peers' whole super-packets in, through a local receive-only "
         f"device {RX_VXLAN_DEVICE} (UDP port {RX_VXLAN_PORT} on the PublicIP, which takes "
         "nothing from elsewhere), not the loops; the wire is unchanged (pyflannel)",
         _go_bool, True, boolean=True),
    Flag("fastpath-plain-superpackets", "with whole super-packets, send them to a peer on this "
         "same kernel (network namespaces of one machine; a second hello says so) as plain TCP "
         "super-packets, which its kernel path takes straight into its TUN, not through its "
         "receive device; a peer whose hellos do not count them arriving gets the usual ones "
         "again (pyflannel)", _go_bool, True, boolean=True),
    Flag("fastpath-pin-dir", "keep the udp backend's data plane across a restart where no fd "
         "store holds it (a DaemonSet): its TUN persistent, the kernel path pinned in this bpffs "
         "folder (e.g. /sys/fs/bpf/pyflannel), the routes beside the subnet file; removed when "
         "this host's Pod is deleted or another backend runs (pyflannel; off by default)"),
    Flag("v", "log verbosity (klog style: 0 info, 2 and up debug)", _bounded(int, 0, 10), 0),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the problem (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyflanneld", allow_abbrev=False,
        description="flannel's udp backend (and alloc), drop-in for flanneld "
                    f"{FLANNEL_COMPAT}. Every flag can also be set as FLANNELD_<FLAG>.")
    for flag in FLAGS:
        spellings = [f"--{flag.name}", f"-{flag.name}"]
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": flag.help,
                                  "default": argparse.SUPPRESS}
        if flag.boolean:
            kwargs.update(nargs="?", const=True, type=flag.convert)
        elif flag.repeat:
            kwargs.update(action="append", type=flag.convert)
        else:
            kwargs.update(type=flag.convert)
        parser.add_argument(*spellings, **kwargs)
    parser.add_argument("--version", "-version", action="version",
                        version=f"pyflanneld {VERSION} (flanneld {FLANNEL_COMPAT} compatible)")
    parser.add_argument("--print-systemd-unit", action=_PrintSystemdUnit, nargs=0,
                        help="print a systemd unit for pyflanneld (Type=notify) and exit")
    return parser


class _PrintSystemdUnit(argparse.Action):
    """Print the unit shipped in the package (argparse's version action would rewrap it), its
    ExecStart the full path of this pyflanneld: systemd looks a bare command up only in
    /usr/local/bin, /usr/bin and the like, never in a venv."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        import importlib.resources  # only here: it is slow to import

        unit = (importlib.resources.files("control.service") / "pyflanneld.service").read_text()
        command = os.path.abspath(sys.argv[0])
        if os.path.basename(command) == "pyflanneld" and os.access(command, os.X_OK):
            unit = unit.replace("\nExecStart=pyflanneld\n", f"\nExecStart={command}\n")
        sys.stdout.write(unit)
        parser.exit(0)


def parse_args(argv: Sequence[str] | None = None,
               environ: dict[str, str] | None = None) -> Options:
    """Flags from argv, then FLANNELD_* variables for flags not given; exits 2 on bad input."""
    parser = _parser()
    given = vars(parser.parse_args(argv))
    environ = os.environ if environ is None else environ
    values = {}
    for flag in FLAGS:
        if flag.dest in given:
            values[flag.dest] = given[flag.dest]
        elif environ.get(flag.env):
            try:
                value = flag.convert(environ[flag.env])
            except ValueError as err:
                parser.error(f"invalid value {environ[flag.env]!r} for {flag.env}: {err}")
            values[flag.dest] = [value] if flag.repeat else value
        else:
            values[flag.dest] = flag.default
    options = Options(**values)
    if options.subnet_lease_renew_margin * 60 >= options.subnet_lease_ttl:
        parser.error("--subnet-lease-renew-margin must be shorter than the lease TTL "
                     f"({options.subnet_lease_ttl}s)")
    if bool(options.etcd_keyfile) != bool(options.etcd_certfile):
        parser.error("--etcd-keyfile and --etcd-certfile go together")
    if bool(options.etcd_username) != bool(options.etcd_password):
        parser.error("--etcd-username and --etcd-password go together")
    https = options.etcd_endpoints[0].scheme == "https"
    if not https and (options.etcd_cafile or options.etcd_certfile):
        parser.error("--etcd-cafile/--etcd-certfile need https:// --etcd-endpoints")
    for path in (options.etcd_cafile, options.etcd_certfile, options.etcd_keyfile):
        if path and not os.access(path, os.R_OK):
            parser.error(f"cannot read {path}")
    return options
