"""pyflanneld's life: open the subnet manager (etcd, or the Kubernetes API with
--kube-subnet-mgr), find the interface, wait for a usable config, take a lease, start the
backend, write subnet.env, then keep the lease and the routes current until SIGTERM or SIGINT.
On the way out the fast path stops (the TUN goes with it); the lease stays, as flanneld leaves
it, so a restart takes the same subnet back. SIGHUP stops it the same
way but keeps what the backend keeps for a restart, for the process to exec itself again."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from collections.abc import Callable
from typing import NamedTuple

from control.backend.common import Backend, BackendError
from control.backend.manager import clear_other_backends, make_backend
from control.backend.udp import UdpBackend
from control.host.interface import ExternalInterface, HostError, Netlink
from control.host.iptables import IPTablesError, Rule, RuleKeeper, host_rules, recycle
from control.host.subnetenv import (
    SubnetEnv,
    read_previous_subnets,
    read_variables,
    write_subnet_env,
)
from control.service.endpoints import healthz_page, serve_http
from control.service.handover import keep_for_next_run, release, restart_in_place
from control.service.options import Options
from control.service.pinstore import PinStore
from control.service.sdnotify import notify, watchdog_period
from control.subnet.config import ConfigError, NetworkConfig, parse_config
from control.subnet.lease import Keeper, LeaseKeeper, OutOfSubnetsError, Subnets
from control.subnet.registry import LeaseStore, Registry, RegistryError, answering_first
from control.subnet.watch import SubnetWatcher
from fastpath import FastPath

log = logging.getLogger("pyflanneld")

CONFIG_RETRY_SECONDS = 1.0
STOP_GRACE_SECONDS = 2.0  # a stop waits this long for the tasks to wind down


class Fatal(Exception):
    """Ends the daemon with status 1, as the same problem ends flanneld."""


class SubnetManager(NamedTuple):
    """The subnet manager the flags chose: where the config and the leases are, and what takes
    and keeps this host's lease there (for the config and the backend's lease value, which
    holds this host's public addresses)."""

    registry: Registry
    keeper: Callable[[NetworkConfig, bytes], Keeper]
    watching: str  # what the watch follows, for the log


async def open_subnet_manager(options: Options) -> SubnetManager:
    """etcd's, or the Kubernetes API's with --kube-subnet-mgr: the one place that asks. Only
    the chosen one's client is imported: the others would cost 7 MiB (python-etcd), 13 MiB
    (aetcd with gRPC) or 7 MiB (httpx) of the 50Mi flannel gives flanneld."""
    if options.kube_subnet_mgr:
        return await open_kube_manager(options)
    registry = await open_etcd(options)

    def keeper(config: NetworkConfig, value: bytes) -> Keeper:
        previous = read_previous_subnets(options.subnet_file)
        return LeaseKeeper(registry, config, value,
                           Subnets(*previous) if any(previous) else None,
                           ttl=options.subnet_lease_ttl,
                           renew_margin=options.subnet_lease_renew_margin * 60)

    return SubnetManager(registry, keeper, f"{options.etcd_prefix.rstrip('/')}/subnets/")


async def open_kube_manager(options: Options) -> SubnetManager:
    """The API server and this host's Node. A configuration that cannot work ends the daemon,
    as it ends flanneld; an API server that does not answer yet is asked again every second
    (flanneld exits, and its Pod restarts)."""
    from control.subnet.kube import NodeLease, open_kube
    from control.subnet.kubeclient import KubeApiError, KubeConfigError

    while True:
        try:
            registry, node = await open_kube(options.kubeconfig_file, options.kube_api_url,
                                             options.kube_annotation_prefix,
                                             options.net_config_path)
            break
        except (KubeConfigError, ValueError) as err:
            raise Fatal(f"Failed to create SubnetManager: {err}") from err
        except KubeApiError as err:
            log.error("Failed to create SubnetManager: %s; trying again in %gs", err,
                      CONFIG_RETRY_SECONDS)
            await asyncio.sleep(CONFIG_RETRY_SECONDS)
    log.info("Created subnet manager: Kubernetes Subnet Manager - %s", node)

    def keeper(config: NetworkConfig, value: bytes) -> Keeper:
        return NodeLease(registry, node, config, value,
                         set_network_unavailable=options.set_node_network_unavailable)

    return SubnetManager(registry, keeper, "Nodes")


async def open_etcd(options: Options) -> LeaseStore:
    """The registry for --etcd-api, on the endpoints in the order that answers first."""
    endpoints = await answering_first([(e.host, e.port) for e in options.etcd_endpoints])
    if options.etcd_api == "v2":
        from control.subnet.etcdv2 import EtcdV2Registry

        cert = None
        if options.etcd_certfile and options.etcd_keyfile:
            cert = (options.etcd_certfile, options.etcd_keyfile)
        return EtcdV2Registry(endpoints, options.etcd_prefix,
                              protocol=options.etcd_endpoints[0].scheme,
                              username=options.etcd_username, password=options.etcd_password,
                              cert=cert, ca_cert=options.etcd_cafile)
    from control.subnet.etcdv3 import EtcdV3Registry, TLSFiles

    # gRPC's target is host:port: an IPv6 address (an IPv6-only underlay's etcd) in brackets.
    endpoints = [(f"[{host}]" if ":" in host else host, port) for host, port in endpoints]

    tls = None
    if options.etcd_endpoints[0].scheme == "https":
        tls = TLSFiles(options.etcd_cafile, options.etcd_certfile, options.etcd_keyfile)
    return EtcdV3Registry(endpoints, options.etcd_prefix, username=options.etcd_username,
                          password=options.etcd_password, tls=tls)


def describe(config: NetworkConfig) -> str:
    """The config's networks and ranges, for the log."""
    parts = []
    if config.enable_ipv4:
        parts.append(f"Network {config.network}, SubnetLen {config.subnet_len}, SubnetMin "
                     f"{config.subnet_min}, SubnetMax {config.subnet_max}")
    if config.enable_ipv6:
        parts.append(f"IPv6Network {config.ipv6_network}, IPv6SubnetLen "
                     f"{config.ipv6_subnet_len}, IPv6SubnetMin {config.ipv6_subnet_min}, "
                     f"IPv6SubnetMax {config.ipv6_subnet_max}")
    return "; ".join(parts)


def find_interface(options: Options, netlink: Netlink, config: NetworkConfig
                   ) -> tuple[ExternalInterface, ipaddress.IPv4Address | None,
                              ipaddress.IPv6Address | None]:
    """The external interface for the config's families, and this host's public addresses:
    --public-ip and --public-ipv6, else the interface's own. Fatal when there is none, as
    flanneld exits."""
    try:
        ext = netlink.external_interface(
            options.iface, options.iface_regex, ipv4=config.enable_ipv4,
            ipv6=config.enable_ipv6, public_ip=options.public_ip,
            public_ipv6=options.public_ipv6,
            ipv4_optional=config.backend_type == "udp")  # over an IPv6 underlay
    except HostError as err:
        raise Fatal(f"finding the external interface: {err}") from err
    public_ip = (options.public_ip or ext.address) if config.enable_ipv4 else None
    public_ipv6 = ext.public_ipv6  # --public-ipv6 or the interface's; None without IPv6
    log.info("using interface %s (%s, MTU %d), public IP %s", ext.name,
             ", ".join(str(a) for a in (ext.address, ext.ipv6) if a is not None), ext.mtu,
             ", ".join(str(a) for a in (public_ip, public_ipv6) if a is not None))
    return ext, public_ip, public_ipv6


async def wait_for_config(registry: Registry, options: Options, netlink: Netlink,
                          resumed: FastPath | None = None
                          ) -> tuple[NetworkConfig, ExternalInterface, Backend]:
    """Read <prefix>/config until it is there and its backend can run here, logging why not
    every second, as flanneld does: daemons may start before the operator writes it. The
    external interface is found for the config's families (IPv4, IPv6 or both); the backend is
    prepared (the vxlan devices made) but holds no lease yet."""
    key = registry.config_source
    while True:
        try:
            raw = await registry.get_config()
            if raw is None:
                raise ConfigError("flannel config not found in etcd store. Did you create your "
                                  f"config using etcd{options.etcd_api} API?")
            config = parse_config(raw)
            ext, public_ip, public_ipv6 = find_interface(options, netlink, config)
            backend = make_backend(config, netlink, ext, public_ip, public_ipv6, options,
                                   resumed)
            backend.prepare()
            clear_other_backends(config, netlink.rtnl, ext, backend.devices,
                                 PinStore.of(options))
            return config, ext, backend
        except (ConfigError, BackendError) as err:
            log.error("config %s: %s; trying again in %gs", key, err, CONFIG_RETRY_SECONDS)
        except RegistryError as err:
            log.error("reading config %s failed: %s; trying again in %gs", key, err,
                      CONFIG_RETRY_SECONDS)
        except OSError as err:
            log.error("config %s: clearing an earlier backend's devices failed: %s; trying "
                      "again in %gs", key, err, CONFIG_RETRY_SECONDS)
        await asyncio.sleep(CONFIG_RETRY_SECONDS)


class Daemon:
    def __init__(self, options: Options, handed: dict[str, int] | None = None,
                 resumed: FastPath | None = None) -> None:
        """handed: descriptors the previous run kept (systemd's fd store); resumed: the fast
        path already forwarding on some of them (control/service/handover.py)."""
        self.options = options
        self.handed = dict(handed or {})
        self.resumed = resumed
        self.netlink = Netlink()
        self.registry: Registry | None = None  # opened by serve(), which may wait for it
        self.backend: Backend | None = None
        self.config: NetworkConfig | None = None  # once read
        self.subnet_env: SubnetEnv | None = None
        self.iptables = RuleKeeper(options.iptables_resync)
        self.keeper: Keeper | None = None  # once the subnet manager is open
        self.leaving = False  # this host leaves the cluster as the daemon stops

    async def host_leaves(self) -> bool:
        """Whether the subnet manager says this host is leaving (a few seconds at most)."""
        if self.keeper is None:
            return False
        try:
            async with asyncio.timeout(STOP_GRACE_SECONDS):
                return await self.keeper.leaving()
        except TimeoutError:
            return False

    async def serve(self) -> None:
        options = self.options
        manager = await open_subnet_manager(options)
        self.registry = registry = manager.registry
        config, ext, self.backend = await wait_for_config(registry, options, self.netlink,
                                                          self.resumed)
        self.config = config
        log.info("config: %s, backend %s%s", describe(config), config.backend_type,
                 f" port {config.port}" if config.backend_type == "udp" else "")
        if not config.enable_ipv4 and not options.kube_subnet_mgr:
            # flannel's #1539: its etcd subnet manager has no IPv6-only mode.
            log.warning("flanneld v0.20.2 cannot share an IPv6-only network in etcd: each of "
                        "its hosts advertises PublicIP 0.0.0.0 and takes another host's lease "
                        "(pyflanneld hosts find theirs by PublicIPv6)")

        self.keeper = keeper = manager.keeper(config, self.backend.lease_value())
        try:
            subnet = await keeper.acquire()
        except OutOfSubnetsError as err:
            raise Fatal(str(err)) from err

        release(self.handed)  # what the backend did not resume with
        try:
            mtu = self.backend.start(subnet)
        except BackendError as err:
            raise Fatal(str(err)) from err
        keep_for_next_run(self.backend.kept())
        if options.ip_masq:  # before subnet.env is written over: it says what the last run had
            try:
                previous = read_variables(options.subnet_file)
            except OSError:
                previous = {}
            try:
                await recycle(previous, *self._families(subnet))
            except IPTablesError as err:  # flanneld exits here too
                raise Fatal(f"recycling the previous run's iptables rules: {err}") from err
        network, _, network6, _ = self._families(subnet)
        self.subnet_env = SubnetEnv(network, subnet.ipv4, mtu, options.ip_masq, network6,
                                    subnet.ipv6)
        write_subnet_env(options.subnet_file, self.subnet_env)
        log.info("wrote %s: FLANNEL_SUBNET for %s, MTU %d", options.subnet_file, subnet, mtu)
        notify(f"READY=1\nSTATUS={self._status()}")

        watcher = SubnetWatcher(registry, config, self.backend,
                                own_subnet=lambda: keeper.subnet,
                                own_value=lambda: keeper.value, on_own_lost=keeper.lost,
                                give_way=keeper.give_way)

        async def on_new_subnet(new: Subnets) -> None:
            await self._move_to(new)
            watcher.resync()

        tasks = [watcher.run(), keeper.keep(on_new_subnet), keeper.complete()]
        if isinstance(self.backend, UdpBackend):
            tasks.append(self.backend.greet_peers(lambda: keeper.subnet, lambda: watcher.peers))
        self.iptables.rules = await self._iptables_rules(subnet)
        if self.iptables.rules:
            tasks.append(self.iptables.keep())
        if options.healthz_port:
            tasks.append(serve_http(options.healthz_ip, options.healthz_port,
                                    {b"/healthz": healthz_page(lambda: keeper.held)}, "healthz"))
        if options.metrics_port:
            # prometheus_client costs memory: only a daemon that serves metrics imports it.
            from control.service.metrics import DaemonCollector, metrics_page

            fastpath = self.backend.fastpath if isinstance(self.backend, UdpBackend) else None
            page = metrics_page(DaemonCollector(keeper, watcher, registry.counts, fastpath))
            tasks.append(serve_http(options.metrics_ip, options.metrics_port,
                                    {b"/metrics": page}, "metrics"))
        period = watchdog_period()
        if period is not None:
            tasks.append(self._ping_watchdog(period))
        log.info("running: watching %s", manager.watching)
        async with asyncio.TaskGroup() as group:
            for task in tasks:
                group.create_task(task)

    def _families(self, subnets: Subnets
                  ) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv4Network | None,
                             ipaddress.IPv6Network | None, ipaddress.IPv6Network | None]:
        """(Network, this host's subnet, IPv6Network, its IPv6 subnet), None for a family
        the config does not enable."""
        config = self.config
        assert config is not None
        return (config.network if config.enable_ipv4 else None, subnets.ipv4,
                config.ipv6_network if config.enable_ipv6 else None, subnets.ipv6)

    async def _iptables_rules(self, subnets: Subnets) -> list[Rule]:
        return await host_rules(self.options.ip_masq, self.options.iptables_forward_rules,
                                *self._families(subnets))

    def _status(self) -> str:
        """systemd's one-line status: what this host serves."""
        assert self.subnet_env is not None
        assert self.backend is not None
        env = self.subnet_env
        served = ", ".join(f"subnet {subnet} of {network}" for subnet, network in (
            (env.subnet, env.network), (env.ipv6_subnet, env.ipv6_network))
            if subnet is not None)
        return f"{served}, {self.backend.status()}, MTU {env.mtu}"

    async def _ping_watchdog(self, period: float) -> None:
        """WATCHDOG=1 while the event loop turns: a hung control plane gets restarted."""
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(period)

    async def _move_to(self, new: Subnets) -> None:
        """The lease came back as another subnet: readdress the TUN and rewrite subnet.env.
        Containers addressed from the old subnet must be re-addressed, as after a flanneld
        restart that loses its subnet."""
        assert self.subnet_env is not None
        old = Subnets(self.subnet_env.subnet, self.subnet_env.ipv6_subnet)
        log.warning("this host's subnet moved from %s to %s", old, new)
        assert self.backend is not None
        try:
            self.backend.move(old, new)
        except (BackendError, HostError) as err:
            log.error("readdressing for %s: %s", new, err)
        self.subnet_env = self.subnet_env._replace(subnet=new.ipv4, ipv6_subnet=new.ipv6)
        write_subnet_env(self.options.subnet_file, self.subnet_env)
        notify(f"STATUS={self._status()}")
        if self.options.ip_masq:
            try:
                await self.iptables.replace(await self._iptables_rules(new))
            except IPTablesError as err:
                log.error("iptables: %s", err)

    async def close(self) -> None:
        # The data plane last: it forwards while the rest winds down (a restart's stall).
        if self.registry is not None:
            await self.registry.close()
        if self.backend is not None:
            if self.leaving:
                log.info("this host leaves the cluster: removing what was kept for a restart")
                self.backend.leave()
            self.backend.stop()
        if self.resumed is not None:  # when no backend took it over (stop() is idempotent)
            self.resumed.stop()
        self.netlink.close()


def _pending_tasks() -> str:
    """Where each unfinished task waits: for the log, when stopping takes too long."""
    waits = []
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            frames = task.get_stack(limit=2)
            where = ", ".join(f"{f.f_code.co_name} ({f.f_code.co_filename}:{f.f_lineno})"
                              for f in frames)
            waits.append(f"{task.get_name()}: {where}")
    return "; ".join(waits)


async def run_daemon(options: Options, handed: dict[str, int] | None = None,
                     resumed: FastPath | None = None) -> int:
    """Run until SIGTERM/SIGINT (status 0) or a fatal problem (status 1). After SIGHUP this
    process execs itself again, handing the next image what the backend keeps."""
    daemon = Daemon(options, handed, resumed)
    serving = asyncio.ensure_future(daemon.serve())
    loop = asyncio.get_running_loop()
    signalled: asyncio.Future[signal.Signals] = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(
            signum, lambda s=signum: signalled.done() or signalled.set_result(s))
    abandoned = False
    carried = None
    try:
        await asyncio.wait({serving, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if signalled.done():
            signum = signalled.result()
            if signum == signal.SIGHUP:
                log.info("got SIGHUP: restarting in place")
            else:
                log.info("got %s: stopping", signum.name)
                notify("STOPPING=1")
                daemon.leaving = await daemon.host_leaves()
            serving.cancel()
            await asyncio.wait({serving}, timeout=STOP_GRACE_SECONDS)
            if not serving.done():
                # A library task that ignores cancellation must not keep the daemon alive.
                log.warning("tasks still busy after %gs; exiting without them: %s",
                            STOP_GRACE_SECONDS, _pending_tasks())
                abandoned = True
            if signum == signal.SIGHUP:  # copies: stopping the backend closes its own
                kept = daemon.backend.kept() if daemon.backend is not None else {}
                carried = {name: os.dup(fd) for name, fd in kept.items()}
            log.info("stopped; the lease stays")
            return 0
        serving.result()
        return 0
    except Fatal as err:
        log.error("%s", err)
        return 1
    except BaseExceptionGroup as group:
        log.error("stopping: %s", group.exceptions[0], exc_info=group.exceptions[0])
        return 1
    finally:
        await daemon.close()
        if carried is not None:
            restart_in_place(carried)
        if abandoned:  # asyncio.run would wait for those tasks forever
            logging.shutdown()
            os._exit(0)
