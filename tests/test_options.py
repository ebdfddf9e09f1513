"""pyflanneld's flags: flanneld's names and defaults, FLANNELD_* variables, clear refusals."""

import ipaddress
import os
import subprocess
import sys
import tomllib

import pytest

from control.service.options import VERSION, Endpoint, parse_args
from tests.flanneld import REPO


def test_flanneld_defaults() -> None:
    options = parse_args([], environ={})
    assert options.etcd_endpoints == [Endpoint("http", "127.0.0.1", 4001),
                                      Endpoint("http", "127.0.0.1", 2379)]
    assert options.etcd_prefix == "/coreos.com/network"
    assert options.subnet_file == "/run/flannel/subnet.env"
    assert options.subnet_lease_renew_margin == 60
    assert (options.ip_masq, options.healthz_port, options.etcd_api) == (False, 0, "v3")


def test_go_style_spellings() -> None:
    options = parse_args(["-iface=eth0", "--iface", "198.18.0.1", "-ip-masq",
                          "--public-ip=198.18.0.9", "-etcd-endpoints", "http://e1:1,http://e2"],
                         environ={})
    assert options.iface == ["eth0", "198.18.0.1"]
    assert options.ip_masq is True
    assert options.public_ip == ipaddress.IPv4Address("198.18.0.9")
    assert options.etcd_endpoints == [Endpoint("http", "e1", 1), Endpoint("http", "e2", 2379)]


def test_environment_fills_what_the_command_line_leaves() -> None:
    options = parse_args(["--etcd-prefix=/cli"], environ={
        "FLANNELD_ETCD_PREFIX": "/env", "FLANNELD_IFACE": "eth1", "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30"})
    assert options.etcd_prefix == "/cli"
    assert options.iface == ["eth1"]
    assert options.ip_masq is True
    assert options.subnet_lease_renew_margin == 30


def test_public_ipv6_from_the_flag_or_flanneld_s_variable() -> None:
    assert parse_args([], environ={}).public_ipv6 is None
    assert parse_args(["-public-ipv6=2001:DB8::9"], environ={}).public_ipv6 == \
        ipaddress.IPv6Address("2001:db8::9")
    options = parse_args([], environ={"FLANNELD_PUBLIC_IPV6": "2001:db8::a"})
    assert options.public_ipv6 == ipaddress.IPv6Address("2001:db8::a")


def test_fast_path_levers_default_to_what_make_perf_chose() -> None:
    defaults = parse_args([], environ={})
    assert (defaults.fastpath_batch, defaults.fastpath_offload, defaults.fastpath_udp_coalesce,
            defaults.fastpath_nice, defaults.fastpath_kernel) == (64, True, True, -10, "on")
    turned = parse_args(["--fastpath-udp-coalesce=false", "--fastpath-nice", "0",
                         "--fastpath-kernel", "off"], environ={"FLANNELD_FASTPATH_BATCH": "1"})
    assert (turned.fastpath_batch, turned.fastpath_udp_coalesce, turned.fastpath_nice,
            turned.fastpath_kernel) == (1, False, 0, "off")


@pytest.mark.parametrize(("argv", "environ", "named"), [
    (["--fastpath-nice", "-21"], {}, "--fastpath-nice"),
    (["--fastpath-udp-coalesce=sometimes"], {}, "--fastpath-udp-coalesce"),
    (["--fastpath-kernel", "rx"], {}, "--fastpath-kernel"),
    (["--fastpath-scatter=false"], {}, "--fastpath-scatter"),  # levers that did not pay
    (["--fastpath-next-hop-cache=false"], {}, "--fastpath-next-hop-cache"),
    (["--bogus"], {}, "--bogus"),
    (["--public-ip", "300.1.1.1"], {}, "--public-ip"),
    (["--etcd-endpoints", "ftp://x"], {}, "--etcd-endpoints"),
    (["--subnet-lease-renew-margin", "1440"], {}, "--subnet-lease-renew-margin"),
    (["--healthz-port", "70000"], {}, "--healthz-port"),
    (["--etcd-api", "v4"], {}, "--etcd-api"),
    (["--ip-masq=maybe"], {}, "--ip-masq"),
    ([], {"FLANNELD_PUBLIC_IP": "x"}, "FLANNELD_PUBLIC_IP"),
    # What Go's net.ParseIP refuses, and what it reads as IPv4.
    (["--public-ipv6", "2001:db8::g"], {}, "--public-ipv6"),
    (["--public-ipv6=198.18.0.9"], {}, "--public-ipv6"),
    (["--public-ipv6=::ffff:198.18.0.9"], {}, "--public-ipv6"),
    (["--public-ipv6=fe80::1%eth0"], {}, "--public-ipv6"),
    ([], {"FLANNELD_PUBLIC_IPV6": "2001:db8::/64"}, "FLANNELD_PUBLIC_IPV6"),
    (["--etcd-cafile", "/ca.pem"], {}, "need https://"),
    (["--etcd-endpoints", "https://e:2379", "--etcd-cafile", "/nonexistent/ca.pem"], {},
     "cannot read /nonexistent/ca.pem"),
    (["--etcd-username", "u"], {}, "--etcd-password"),
])
def test_bad_input_exits_2_naming_it(argv: list[str], environ: dict[str, str], named: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv, environ=environ)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def test_the_command_refuses_a_bad_flag_in_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "control", "--iface"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pyflanneld: error: argument --iface/-iface: expected one argument (see --help)"]


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "control", "--version"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "pyflanneld" in result.stdout


def test_version_is_the_packages() -> None:
    """options.py writes the version out: importlib.metadata would cost every start-up its
    import. pyproject.toml's is the package's; they must agree."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert VERSION == tomllib.load(f)["project"]["version"]
