"""pyflannel-docker-opts on subnet.env files as the daemon writes them: the bytes flannel's
mk-docker-opts.sh writes for the same flags (compared against the script when this was
written), and -m as the script documents it."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from control.host.subnetenv import SubnetEnv, write_subnet_env

BIP, MTU, MASQ = '--bip=10.10.16.1/20', '--mtu=1472', '--ip-masq=false'


def run(tmp_path: object, ip_masq: bool | None, *flags: str,
        environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit status, the Docker env file, stderr) for a subnet.env written by the daemon's
    writer (None: no subnet.env at all)."""
    subnet_env = os.path.join(str(tmp_path), "subnet.env")
    docker_env = os.path.join(str(tmp_path), "docker_opts.env")
    if ip_masq is not None:
        write_subnet_env(subnet_env, SubnetEnv(ipaddress.IPv4Network("10.0.0.0/8"),
                                               ipaddress.IPv4Network("10.10.16.0/20"), 1472,
                                               ip_masq))
    result = subprocess.run([sys.executable, "-m", "control.programs.dockeropts", "-f", subnet_env,
                             "-d", docker_env, *flags], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **(environ or {})})
    written = open(docker_env).read() if os.path.exists(docker_env) else ""
    return result.returncode, written, result.stderr


@pytest.mark.parametrize(("ip_masq", "flags", "expected"), [
    (True, [], f'DOCKER_OPT_BIP="{BIP}"\nDOCKER_OPT_IPMASQ="{MASQ}"\nDOCKER_OPT_MTU="{MTU}"\n'
               f'DOCKER_OPTS=" {BIP} {MASQ} {MTU} "\n'),
    (False, [], f'DOCKER_OPT_BIP="{BIP}"\nDOCKER_OPT_MTU="{MTU}"\nDOCKER_OPTS=" {BIP} {MTU} "\n'),
    (True, ["-i"], f'DOCKER_OPT_BIP="{BIP}"\nDOCKER_OPT_IPMASQ="{MASQ}"\n'
                   f'DOCKER_OPT_MTU="{MTU}"\n'),
    (True, ["-c", "-k", "DOCKER_NETWORK_OPTIONS"],
     f'DOCKER_NETWORK_OPTIONS=" {BIP} {MASQ} {MTU} "\n'),
    (True, ["-c", "-m"], f'DOCKER_OPTS=" {BIP} {MTU} "\n'),
])
def test_the_docker_env_file_is_mk_docker_opts_output(tmp_path: object, ip_masq: bool,
                                                      flags: list[str], expected: str) -> None:
    status, written, _ = run(tmp_path, ip_masq, *flags)
    assert status == 0
    assert written == expected


def test_what_the_environment_holds_comes_first_and_along(tmp_path: object) -> None:
    status, written, _ = run(tmp_path, False, environ={"DOCKER_OPTS": "--debug",
                                                       "DOCKER_OPT_X": "--x=1"})
    assert status == 0
    assert written == (f'DOCKER_OPT_BIP="{BIP}"\nDOCKER_OPT_MTU="{MTU}"\nDOCKER_OPT_X="--x=1"\n'
                       f'DOCKER_OPTS="--debug {BIP} {MTU} --x=1 "\n')


def test_without_subnet_env_it_says_so_and_writes_no_options(tmp_path: object) -> None:
    status, written, stderr = run(tmp_path, None)
    assert status == 0 and written == 'DOCKER_OPTS=" "\n'
    assert "subnet.env not found" in stderr


def test_an_unknown_flag_exits_2(tmp_path: object) -> None:
    status, _, stderr = run(tmp_path, True, "-x")
    assert status == 2 and "-x" in stderr
