"""GET /metrics in Prometheus' text format (through prometheus_client, imported only when
--metrics-port asks for it). Everything is read at scrape time from where it is already kept:
the fast path's counters, the watcher's routes and event counts, the lease keeper's state, the
registry's etcd counts. No second bookkeeping."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from control.service.endpoints import Page

if TYPE_CHECKING:
    from control.subnet.lease import Keeper
    from control.subnet.registry import EtcdCounts
    from control.subnet.watch import SubnetWatcher
    from fastpath import FastPath

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# The upper bounds of the fast path's power-of-two buckets of packets per wake-up (1, 2-3, 4-7,
# ..., 128 and more: BATCH_BUCKETS in fastpath/loops.pxd), as a histogram's `le`.
BATCH_BOUNDS = ["1", "3", "7", "15", "31", "63", "127", "+Inf"]
# Counters of the fast path that are drops, by the reason in their name.
DROP_PREFIX = "drop_"


class DaemonCollector:
    """A prometheus_client collector over one daemon's state."""

    def __init__(self, keeper: Keeper, watcher: SubnetWatcher, etcd: EtcdCounts,
                 fastpath: FastPath | None) -> None:
        self.keeper = keeper
        self.watcher = watcher
        self.etcd = etcd
        self.fastpath = fastpath

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pyflannel_lease_held", "1 while this host holds its lease",
                                value=float(self.keeper.held))
        yield GaugeMetricFamily("pyflannel_lease_expiry_seconds",
                                "seconds until this host's lease expires unless renewed",
                                value=self.keeper.expires_in())
        yield CounterMetricFamily("pyflannel_lease_errors_total",
                                  "failed attempts to take or renew the lease",
                                  value=self.keeper.errors)
        yield GaugeMetricFamily("pyflannel_routes", "other hosts' subnets routed",
                                value=len(self.watcher.peers))
        yield CounterMetricFamily("pyflannel_watch_events_total",
                                  "lease changes from etcd applied to the routes",
                                  value=self.watcher.events_applied)
        restarts = CounterMetricFamily("pyflannel_watch_restarts_total",
                                       "times the lease watch started again", labels=["reason"])
        for reason, count in sorted(self.watcher.restarts.items()):
            restarts.add_metric([reason], count)
        yield restarts
        yield CounterMetricFamily("pyflannel_etcd_reconnects_total",
                                  "times etcd answered again after a call failed, or another "
                                  "endpoint answered than before (a failover)",
                                  value=self.etcd.reconnects)
        errors = CounterMetricFamily("pyflannel_etcd_errors_total",
                                     "registry calls to etcd that failed", labels=["operation"])
        for operation, count in self.etcd.errors.items():
            errors.add_metric([operation], count)
        yield errors
        if self.fastpath is not None:
            yield from fastpath_metrics(self.fastpath.stats())


# Counters of one direction's loop: (metric name, its help, "tx" or "rx", the loop's counter).
ONE_WAY_COUNTERS = [
    ("tso_superpackets", "TCP super-packets from the TUN cut into segments", "tx",
     "tso_superpackets"),
    ("gro_superdatagrams", "receives the kernel's UDP_GRO merged from several datagrams", "rx",
     "gro_superdatagrams"),
    ("gro_datagrams", "datagrams received merged by UDP_GRO", "rx", "gro_datagrams"),
    ("coalesced_packets", "received packets merged into the one before them", "rx",
     "coalesced"),
    ("whole_superpackets", "received datagrams that were one whole TCP super-packet, written "
     "as one", "rx", "whole_superpackets"),
    ("hellos", "peers' hellos (they take whole super-packets) that reached the loops, where "
     "they go unused", "rx", "hellos"),
    ("icmp_unreachable", "ICMP net unreachable written back for packets without route", "tx",
     "icmp_unreachable"),
]

def fastpath_metrics(stats: dict[str, Any]) -> Iterator[Metric]:
    """The fast path's counters: tx is TUN -> UDP, rx UDP -> TUN."""
    families = {
        "packets": CounterMetricFamily("pyflannel_fastpath_packets_total",
                                       "IPv4 packets carried", labels=["direction"]),
        "bytes": CounterMetricFamily("pyflannel_fastpath_bytes_total",
                                     "bytes of IPv4 packets carried", labels=["direction"]),
    }
    # Its count is the wake-ups that moved packets.
    batches = HistogramMetricFamily("pyflannel_fastpath_batch_packets",
                                    "packets moved per wake-up: TUN reads (tx; a TSO "
                                    "super-packet is one) or datagrams received (rx)",
                                    labels=["direction"])
    drops = CounterMetricFamily("pyflannel_fastpath_drops_total", "packets dropped",
                                labels=["direction", "reason"])
    for direction in ("tx", "rx"):
        counters = stats[direction]
        for name, family in families.items():
            family.add_metric([direction], counters[name])
        cumulative = itertools.accumulate(counters["batch_sizes"])
        batches.add_metric([direction], list(zip(BATCH_BOUNDS, cumulative, strict=True)),
                           sum_value=counters["batch_packets"])
        for name, count in counters.items():
            if name.startswith(DROP_PREFIX):
                drops.add_metric([direction, name.removeprefix(DROP_PREFIX)], count)
    yield from families.values()
    yield batches
    yield drops
    for name, documentation, direction, counter in ONE_WAY_COUNTERS:
        yield CounterMetricFamily(f"pyflannel_fastpath_{name}_total", documentation,
                                  value=stats[direction][counter])
    if "kernel" in stats:
        yield from kernel_path_metrics(stats["kernel"])


def kernel_path_metrics(counters: dict[str, int]) -> Iterator[Metric]:
    """The tc programs' counters (--fastpath-kernel): what they carried never reached the loops
    counted above, and what they passed on did."""
    for name, help_text in (("packets", "packets (IPv4 and IPv6) carried by the kernel path"),
                            ("bytes", "bytes of packets carried by the kernel path"),
                            ("superpackets", "GSO super-packets among them, carried whole"),
                            ("plain", "super-packets among those sent plain to, or arrived "
                             "plain from, a peer on this kernel"),
                            ("passed", "packets the kernel path left to the loops")):
        family = CounterMetricFamily(f"pyflannel_kernelpath_{name}_total", help_text,
                                     labels=["direction"])
        for direction in ("tx", "rx"):
            family.add_metric([direction], counters[f"{direction}_{name}"])
        yield family
    yield CounterMetricFamily("pyflannel_kernelpath_hellos_total",
                              "peers' hellos noted: they take whole TCP super-packets",
                              value=counters["rx_hellos"])
    yield CounterMetricFamily("pyflannel_kernelpath_in_order_total",
                              "received datagrams left to the loops (among those passed) behind "
                              "their flow's merged ones, which they would overtake",
                              value=counters["rx_in_order"])
    family = CounterMetricFamily(
        "pyflannel_kernelpath_vxlan_receive_total", "peers' whole super-packets handed to the "
        "receive device, those that arrived on flannel0 through it, and what reached it from "
        "elsewhere (dropped)", labels=["stage"])
    for stage in ("handed", "arrived", "foreign"):
        family.add_metric([stage], counters[f"rx_vxlan_{stage}"])
    yield family


def metrics_page(collector: DaemonCollector) -> Page:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]  # a collector needs only collect()

    def page() -> tuple[bytes, bytes, bytes]:
        return b"200 OK", CONTENT_TYPE, generate_latest(registry)
    return page
