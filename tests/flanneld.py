"""flanneld itself (the reference build in ../shared/reference/, or a binary the user gives) on a
testbed host: a real peer for the compatibility tests, and the rows of `make perf` that measure
flanneld's own backends beside pyflannel.

Quirks of flanneld v0.20.2 this works around: it can miss the lease events of a host that joins
at the same moment (so the caller starts one host at a time and checks the routes), it panics on
SIGTERM (so its exit status means nothing) and leaves its iptables rules and its VXLAN device
behind (so clean() removes them)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.cluster import PREFIX, Flanneld, LoggedDaemon
from tests.etcd import EtcdServer
from tests.testbed import Host, Testbed, end_process

FORWARD_CHAIN, FORWARD_COMMENT = "FLANNEL-FWD", "flanneld forward"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Present on CI and the developers' machines, absent on a user's: the tests that need them skip.
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "reference")
REFERENCE_FLANNELD = os.path.join(REFERENCE, "flanneld-v0.20.2")
REFERENCE_CNI = os.path.join(REFERENCE, "flannel-cni-v1.1.0")


class RealFlanneld(LoggedDaemon):
    """One flanneld process in a host's namespace, on etcd's v3 API, with its own subnet file
    and log in the testbed's workdir."""

    def __init__(self, binary: str, bed: Testbed, host: Host, etcd: EtcdServer,
                 *flags: str) -> None:
        subnet_file = os.path.join(bed.workdir, f"{host.netns}-flanneld.env")
        super().__init__(host, subnet_file,
                         os.path.join(bed.workdir, f"{host.netns}-flanneld.log"),
                         ["ip", "netns", "exec", host.netns, binary,
                          f"--etcd-endpoints={etcd.endpoint}", f"--etcd-prefix={PREFIX}",
                          "--iface=eth0", f"--subnet-file={subnet_file}",
                          *etcd.client_flags(), *flags])

    def start(self, *, previous: bool = False) -> RealFlanneld:
        """With `previous`, flanneld reads the subnet file the last run left, as a restarted
        flanneld does, and takes its subnets back if it can."""
        if os.path.exists(self.subnet_file) and not previous:
            os.unlink(self.subnet_file)  # so wait_subnet() reads this run's
        return super().start()

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it hangs; its exit status is ignored (it panics)."""
        process, self.process = self.process, None
        if process is not None:
            end_process(process)

    def clean(self, device: str | None) -> None:
        """Remove what flanneld leaves behind: its FORWARD rules and chain, and `device`."""
        self.host.run("iptables", "-D", "FORWARD", "-m", "comment", "--comment",
                      FORWARD_COMMENT, "-j", FORWARD_CHAIN, check=False)
        self.host.run("iptables", "-F", FORWARD_CHAIN, check=False)
        self.host.run("iptables", "-X", FORWARD_CHAIN, check=False)
        if device:
            self.host.ip("link", "del", device, check=False)


REACH_SECONDS = 10.0


def reaches(src: Host, dst: Host) -> bool:
    """Whether a ping from src's container gets dst's container's answer within 1 s."""
    assert dst.container_ip
    return src.in_container("ping", "-c", "1", "-W", "1", dst.container_ip,
                            check=False).returncode == 0


def wait_reachable(src: Host, dst: Host) -> bool:
    deadline = time.monotonic() + REACH_SECONDS
    while time.monotonic() < deadline:
        if reaches(src, dst) and reaches(dst, src):
            return True
    return False


@contextmanager
def beside_flanneld(bed: Testbed, etcd: EtcdServer, *flags: str, device: str | None = None
                    ) -> Iterator[tuple[RealFlanneld, Flanneld]]:
    """(flanneld, pyflanneld with `flags`), each on a host of its own, in one cluster on the
    config already in etcd's v3 keyspace, each host with a container on its subnet, once they
    reach each other.
    flanneld v0.20.2 can miss a lease event (its watch keeps only a response's first event);
    after a restart its listing holds the lease. Both stop on exit, and flanneld's leftovers
    (`device` among them) are removed."""
    flanneld: RealFlanneld | None = None
    pyflanneld: Flanneld | None = None
    try:
        f_host = bed.add_host()
        flanneld = RealFlanneld(REFERENCE_FLANNELD, bed, f_host, etcd).start()
        subnet = flanneld.wait_subnet()
        bed.add_container(f_host, str(subnet), int(flanneld.subnet_env()["FLANNEL_MTU"]))
        p_host = bed.add_host()
        pyflanneld = Flanneld(bed, p_host, etcd, "v3", *flags).start()
        subnet = pyflanneld.wait_subnet()
        assert pyflanneld.subnet_env()["FLANNEL_MTU"] == flanneld.subnet_env()["FLANNEL_MTU"]
        bed.add_container(p_host, str(subnet), int(pyflanneld.subnet_env()["FLANNEL_MTU"]))
        pyflanneld.wait_log("subnet added")
        if not wait_reachable(f_host, p_host):
            flanneld.stop()
            flanneld.start()
            assert wait_reachable(f_host, p_host), flanneld.log()[-3000:]
        yield flanneld, pyflanneld
    finally:
        if pyflanneld is not None:
            pyflanneld.stop()
        if flanneld is not None:
            flanneld.stop()
            flanneld.clean(device)
