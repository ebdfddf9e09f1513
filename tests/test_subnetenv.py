"""subnet.env: flanneld's exact text, atomic writes, and reading the previous subnet back."""

import ipaddress
import os
from pathlib import Path

from control.host.subnetenv import SubnetEnv, read_previous_subnet, write_subnet_env

ENV = SubnetEnv(ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Network("10.244.33.0/24"),
                1472, False)


def test_text_matches_flanneld_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_env(str(path), ENV)
    assert path.read_text() == ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\n"
                                "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    assert os.listdir(path.parent) == ["subnet.env"]  # the temp file was renamed over it


def test_previous_subnet_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_env(str(path), ENV)
    assert read_previous_subnet(str(path)) == ENV.subnet


def test_missing_or_garbled_file_gives_no_previous_subnet(tmp_path: Path) -> None:
    assert read_previous_subnet(str(tmp_path / "nope.env")) is None
    bad = tmp_path / "bad.env"
    bad.write_text("FLANNEL_SUBNET=banana\n")
    assert read_previous_subnet(str(bad)) is None
