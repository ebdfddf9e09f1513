"""The fast path's Python face: open the TUN and the socket, run the two loops in their own
threads without the GIL, change routes while they run, read their counters, stop them."""

import ipaddress
import os
import socket
import sys
import threading

from libc.stdint cimport uint64_t

from fastpath.device import (
    TUN_OFFLOADS, TUN_USO, interface_with, missing_udp_offloads, open_tun, open_udp, tun_identity,
)
from fastpath.hello import boot_id, hello_packet, kernel_hello_packet
from fastpath.udp_tc import KERNEL_MODES, UdpTc, UdpTcUnavailable, detach_underlay
from fastpath.udp_tc import KEPT as KERNEL_KEPT

from fastpath.loops cimport RxCounters, RxLoop, TxCounters, TxLoop, rx_run, tx_run, vector_free, vector_init
from fastpath.offload cimport UDP_MAX_SEGMENTS, VNET_HDR_LEN
from fastpath.system cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, eventfd, pf_load, pf_store, pthread_self, pthread_setname_np,
)
from fastpath.table cimport Peers6, RouteTable, route_table6_t, route_table_t
from fastpath.table import kept_layout

# A slot holds a virtio_net_hdr and any IP packet (a TSO super-packet too) or a UDP_GRO receive.
SLOT_BYTES = VNET_HDR_LEN + 65536
# With offloads any slot may fill: a TSO super-packet from the TUN, a UDP GRO receive, 64 KiB
# each, so a wake-up moves at most SUPERPACKET_SLOTS packets, 1 MiB a direction. A batch of 64
# (4 MiB a direction, all of it touched in make perf's wire regime, where every receive is a
# GRO one) took the daemon to 49 MiB peak RSS, at flannel's 50Mi limit; 16 took it to 46 at the
# same speed (wire regime, 4 trials each: 7.2 against 7.4 Gbit/s with 4 streams, 7.3 against
# 7.2 with one; 64-byte UDP through the loops alone: 62 against 59 kpps). Without offloads a
# packet touches only the first page of its slot, and the whole batch stays.
SUPERPACKET_SLOTS = 16
# Send side, per slot: the headers of a super-packet's segments (up to 64 per message of up to
# 120 bytes; the payloads stay in the slot). A full arena is sent and reused within the wake-up,
# so one message must fit.
HEADER_BYTES_PER_SLOT = UDP_MAX_SEGMENTS * 120
# Send side, per slot: a header and a payload iovec per segment.
IOVS_PER_SLOT = 2 * UDP_MAX_SEGMENTS
MAX_MTU = 65535
IPV6_MIN_MTU = 1280
DEFAULT_BATCH = 64
DEFAULT_MTU = 1472
# What kept() hands the next run, and resume() takes back: these always, the IPv6 route table
# where there is an IPv6 Network, and the kernel path's links and maps (KERNEL_PREFIX +
# udp_tc.KEPT) where it runs on them.
KEPT = ("tun", "socket", "routes")
ROUTES6 = "routes6"
KERNEL_PREFIX = "kernel-"
KEPT_ANY = (*KEPT, ROUTES6, *(KERNEL_PREFIX + name for name in KERNEL_KEPT))
DEFAULT_SOCKET_BUFFER = 4 << 20
# Why an outer-IPv6 fast path runs without the kernel path (tc-BPF: IPv4 underlays only).
KERNEL_IPV4_ONLY = "the kernel path carries IPv4 underlays only"


cdef void snapshot(const uint64_t *src, uint64_t *dst, size_t size) noexcept nogil:
    """Copy a counters struct (all uint64_t) word by word with atomic loads."""
    cdef size_t i
    for i in range(size // sizeof(uint64_t)):
        dst[i] = pf_load(&src[i])


cdef class FastPath:
    """flanneld's udp backend data plane: IPv4 packets from the TUN go, unchanged but for the TTL,
    as one UDP datagram each to the host that owns the destination subnet; datagrams from peers
    go into the TUN. With ipv6_network (flannel's IPv6Network, cut into ipv6_subnet_len
    subnets) IPv6 packets go the same way, unchanged but for the hop limit, to the peers given
    an IPv6 route (set_route takes subnets of either family; table6 holds the IPv6 ones).

    The route table exists from construction, so routes may be set before start() and at any
    time while the loops run. With offload, start() falls back to the plain path on a kernel
    that lacks what it needs, saying what in offload_missing (offload is then False); likewise
    udp_coalesce (merging UDP datagrams into one TUN write) needs Linux 6.2. With
    verify_source (the default) a received packet is delivered only when its source lies in the
    subnet routed to the datagram's sender: anyone else's is dropped and counted. With
    whole_superpackets and the kernel path on a veth underlay, TCP super-packets cross whole to
    the peers that said hello (greet(); see udp_tc.bpf.c). With vxlan_receiver, the name of the
    receive-only vxlan device (udp_tc.RX_VXLAN_DEVICE, made down by the caller, who puts it up
    when through_vxlan says it is used, and deletes it when not: vxlan_missing says why), the
    peers' whole super-packets go through the kernel's VXLAN receive, not the loops. The kernel
    path sends by a next hop it looks up ten times a second, not for every packet (udp_tc.bpf.c's
    struct next_hop). With plain_superpackets and the kernel path, super-packets to peers on
    this same kernel go plain, spared the vxlan device (greet() says which kernel this is;
    refresh() refuses a peer they do not reach). `handed` holds descriptors an earlier run kept
    (`kept()`, named as in KEPT_ANY), taken over where they fit this run's settings.

    With an IPv6 bind_ip (outer6: an underlay without IPv4) the datagrams go over IPv6, to the
    peers' IPv6 addresses (set_route takes them, peers6 holds them): the loops alone carry them
    (no kernel path, no hellos, no whole or plain super-packets), and nothing is kept for a next
    run (kept() is empty, handed descriptors are closed). network may then be None: an IPv6-only
    overlay, ipv6_network its one table.
    """

    cdef readonly RouteTable table    # None without an IPv4 Network (outer IPv6 only)
    cdef readonly RouteTable table6   # None without an IPv6 Network
    cdef route_table6_t no_table6      # what the loops look IPv6 up in then: no routes
    cdef route_table_t no_table        # and IPv4 without an IPv4 Network: no routes
    cdef uint64_t no_entry             # its one entry, 0.0.0.0's: none
    cdef readonly bint outer6          # datagrams over IPv6
    cdef readonly Peers6 peers6        # their peers' addresses (None over IPv4)
    cdef readonly str bind_ip
    cdef readonly int port
    cdef readonly int mtu
    cdef readonly int batch
    cdef readonly bint offload
    cdef readonly str offload_missing
    cdef readonly bint udp_coalesce
    cdef readonly bint verify_source
    cdef readonly int nice
    cdef readonly str nice_error
    cdef readonly str tun_name
    cdef readonly str kernel
    cdef readonly str kernel_missing
    cdef readonly bint whole_superpackets
    cdef readonly str vxlan_receiver
    cdef readonly bint plain_superpackets
    cdef readonly str underlay
    cdef object udp_tc
    cdef str tun_pattern
    cdef int socket_buffer
    cdef TxLoop tx
    cdef RxLoop rx
    cdef uint64_t stop_flag
    cdef int tun_fd
    cdef int wake_fd
    cdef object sock
    cdef list threads
    cdef dict handed

    def __cinit__(self, network, int subnet_len, str bind_ip, int port, *, str tun="flannel%d",
                  int mtu=DEFAULT_MTU, int batch=DEFAULT_BATCH, bint offload=True,
                  bint udp_coalesce=True, int nice=0,
                  int socket_buffer=DEFAULT_SOCKET_BUFFER, str kernel="off", str underlay="",
                  bint verify_source=True, bint whole_superpackets=False,
                  str vxlan_receiver="", bint plain_superpackets=False, dict handed=None,
                  ipv6_network=None, int ipv6_subnet_len=64):
        if batch < 1:
            raise ValueError(f"batch size {batch} must be at least 1")
        if not 68 <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} must be in 68..{MAX_MTU}")
        self.handed = dict(handed or {})
        bind = ipaddress.ip_address(bind_ip)
        self.outer6 = bind.version == 6
        self.peers6 = Peers6() if self.outer6 else None
        if network is None and not (self.outer6 and ipv6_network is not None):
            raise ValueError("no Network: only an outer-IPv6 fast path with an ipv6_network "
                             "goes without one")
        self.table = None
        self.no_table.entries = &self.no_entry  # 0.0.0.0 alone matches, and has no route
        self.no_table.netmask = 0xFFFFFFFF
        if network is not None:
            self.table = RouteTable(network, subnet_len,
                                    -1 if self.outer6 else self.handed.pop("routes", -1))
            if self.table.version != 4:
                raise ValueError(f"the Network {network} is not IPv4 (an IPv6 one is "
                                 "ipv6_network)")
        self.table6 = None
        if ipv6_network is not None:
            if mtu < IPV6_MIN_MTU:  # RFC 8200 5: every IPv6 link carries 1280 bytes
                raise ValueError(f"MTU {mtu} is below IPv6's {IPV6_MIN_MTU}")
            self.table6 = RouteTable(ipaddress.IPv6Network(ipv6_network), ipv6_subnet_len,
                                     -1 if self.outer6 else self.handed.pop(ROUTES6, -1))
        if self.outer6:
            for table in (self.table, self.table6):
                if table is not None:
                    table.carry_over_ipv6(self.peers6)
        self.bind_ip = str(bind)
        self.port = port
        self.underlay = underlay
        self.mtu = mtu
        self.batch = batch
        self.offload = offload
        self.offload_missing = ""
        self.udp_coalesce = udp_coalesce
        self.verify_source = verify_source
        if not -20 <= nice <= 19:
            raise ValueError(f"nice value {nice} must be in -20..19")
        self.nice = nice
        self.nice_error = ""
        self.socket_buffer = socket_buffer
        if kernel not in KERNEL_MODES:
            raise ValueError(f"kernel path {kernel!r} is not one of {', '.join(KERNEL_MODES)}")
        if kernel != "off" and not underlay:
            raise ValueError("the kernel path needs the underlay interface's name")
        self.kernel = kernel
        self.kernel_missing = ""
        if self.outer6 and kernel != "off":
            self.kernel = "off"
            self.kernel_missing = KERNEL_IPV4_ONLY
        self.whole_superpackets = whole_superpackets and not self.outer6
        self.vxlan_receiver = "" if self.outer6 else vxlan_receiver
        self.plain_superpackets = plain_superpackets and not self.outer6
        self.udp_tc = None
        self.tun_pattern = tun
        self.tun_fd = -1
        self.wake_fd = -1
        self.threads = []

    def __dealloc__(self):
        vector_free(&self.tx.vec)
        vector_free(&self.rx.vec)

    @property
    def running(self) -> bool:
        return bool(self.threads)

    @property
    def slots(self) -> int:
        """Packets a wake-up moves: the batch, or SUPERPACKET_SLOTS of it with offloads (which
        start() may find missing and turn off)."""
        return min(self.batch, SUPERPACKET_SLOTS) if self.offload else self.batch

    def greet(self, source, peers) -> int:
        """Say hello (fastpath/hello.py) from `source`, an address of this host's subnet, to
        each peer in `peers` ({(ip, port): an address of its subnet}), if this host takes whole
        super-packets (offloads on); and, where the kernel path takes plain ones, the kernel
        hello beside it. Never waits: a hello that finds the socket's buffer full goes with the
        next greeting. Returns the hellos sent (kernel hellos not counted)."""
        if not (self.offload and self.sock is not None) or self.outer6:
            return 0
        source = ipaddress.IPv4Address(source)
        plain = self.udp_tc.plain_peers() if self.udp_tc is not None and \
            self.udp_tc.plain else None
        kernel = boot_id() if plain is not None else b""
        sent = 0
        for address, destination in peers.items():
            destination = ipaddress.IPv4Address(destination)
            try:
                self.sock.sendto(hello_packet(source, destination), socket.MSG_DONTWAIT,
                                 address)
                sent += 1
                if plain is not None:
                    peer = plain.get(address[0])
                    self.sock.sendto(kernel_hello_packet(
                        source, destination, kernel, peer.received if peer else 0),
                        socket.MSG_DONTWAIT, address)
            except OSError:  # full, or no route to that host just now
                pass
        return sent

    def whole_peers(self) -> dict:
        """The peers whose hello the kernel path noted: PublicIP -> seconds since (a hello
        counts for 7 s)."""
        return self.udp_tc.whole_peers() if self.udp_tc is not None else {}

    def plain_peers(self) -> dict:
        """The peers on this kernel and the plain super-packets between us: PublicIP ->
        udp_tc.PlainPeer."""
        return self.udp_tc.plain_peers() if self.udp_tc is not None else {}

    def refresh(self) -> dict:
        """Follow what may change under a running fast path: the underlay's TSO setting, and
        whether plain super-packets reach each peer on this kernel. Returns the peers refused
        them by this call: PublicIP -> why."""
        return self.udp_tc.refresh() if self.udp_tc is not None else {}

    @property
    def through_vxlan(self) -> bool:
        """Whether peers' whole super-packets go through the vxlan_receiver device now."""
        return self.udp_tc is not None and self.udp_tc.through_vxlan

    def forgo_vxlan(self, why):
        """Leave peers' whole super-packets to the loops from now on (vxlan_missing: why)."""
        if self.udp_tc is not None:
            self.udp_tc.forgo_vxlan(why)

    @property
    def vxlan_missing(self) -> str:
        """Why they do not ("" when they do)."""
        if self.udp_tc is None:
            return "the kernel path does not run" if self.vxlan_receiver else "not asked for"
        return self.udp_tc.vxlan_missing

    @property
    def sends_whole(self) -> bool:
        """Whether TCP super-packets go to peers whole: whole_superpackets, with the kernel
        path sending onto a veth that takes them (TSO on)."""
        return self.udp_tc is not None and self.udp_tc.sends_whole

    @property
    def sends_plain(self) -> bool:
        """Whether they go plain to peers on this kernel: plain_superpackets, with whole ones
        and no queueing discipline on the underlay that could cut them."""
        return self.udp_tc is not None and self.udp_tc.sends_plain

    cdef RouteTable _table_of(self, subnet):
        """The table for `subnet`'s family."""
        if ipaddress.ip_network(subnet).version == 4:
            if self.table is None:
                raise ValueError(f"{subnet} is IPv4 and this fast path has no Network")
            return self.table
        if self.table6 is None:
            raise ValueError(f"{subnet} is IPv6 and this fast path has no ipv6_network")
        return self.table6

    def set_route(self, subnet, ip, int port):
        """Send packets for `subnet` (e.g. "10.244.3.0/24", or "fd00:0:0:3::/64" of the IPv6
        Network: only a pyflannel peer's, since flanneld drops IPv6) to UDP ip:port (IPv4; the
        peer's IPv6 address over outer IPv6)."""
        self._table_of(subnet).set(subnet, ip, port)
        if self.udp_tc is not None:
            self.udp_tc.set_route(subnet, ip, port)

    def del_route(self, subnet):
        """Stop routing `subnet`; its packets then get ICMP net unreachable (ICMPv6 no route)."""
        self._table_of(subnet).delete(subnet)
        if self.udp_tc is not None:
            self.udp_tc.del_route(subnet)

    def start(self):
        """Open the TUN and the UDP socket (in the calling thread's network namespace) and start
        the two loops. The TUN's name is then in tun_name."""
        if self.threads:
            raise RuntimeError("the fast path is already running")
        try:
            if self.offload:
                missing = missing_udp_offloads()
                if missing:
                    self.offload = False
                    self.offload_missing = " and ".join(missing)
            self.tun_fd, self.tun_name, tun_offload, tun_uso = open_tun(
                self.tun_pattern, self.offload, self.handed.pop("tun", -1))
            if self.offload and not tun_offload:
                self.offload = False
                self.offload_missing = TUN_OFFLOADS
            if self.udp_coalesce and not (self.offload and tun_uso):
                self.udp_coalesce = False
                if self.offload:
                    self.offload_missing = TUN_USO
            self.sock = open_udp(self.bind_ip, self.port, self.socket_buffer, self.offload,
                                 self.handed.pop("socket", -1))
            self._start_kernel_path()
            self.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            if self.wake_fd < 0:
                raise OSError("eventfd failed")
            if vector_init(&self.tx.vec, self.slots, SLOT_BYTES, 2 * self.slots,
                           self.slots * (IOVS_PER_SLOT if self.offload else 1),
                           self.slots * HEADER_BYTES_PER_SLOT if self.offload else 0) or \
                    vector_init(&self.rx.vec, self.slots, SLOT_BYTES, self.slots, self.slots, 0):
                raise MemoryError("cannot allocate the packet vectors")
        except BaseException:
            self._close()
            raise
        self._close_handed()  # what this run has no use for: a kept link would go on forwarding
        self.stop_flag = 0
        self.tx.tun_fd = self.rx.tun_fd = self.tun_fd
        self.tx.sock_fd = self.rx.sock_fd = self.sock.fileno()
        self.tx.wake_fd = self.rx.wake_fd = self.wake_fd
        self.tx.stop = self.rx.stop = &self.stop_flag
        self.tx.table = self.rx.table = (
            &self.table.table if self.table is not None else &self.no_table)
        self.tx.peers6 = self.rx.peers6 = self.peers6.addrs if self.outer6 else NULL
        self.tx.table6 = self.rx.table6 = (
            &self.table6.table6 if self.table6 is not None else &self.no_table6)
        self.tx.mtu = self.mtu
        self.rx.verify_source = self.verify_source
        self.rx.mtu = self.mtu
        self.tx.offload = self.rx.offload = self.offload
        self.rx.udp_coalesce = self.udp_coalesce
        # Each thread passes the barrier once it has its priority, so nice_error is known
        # when start() returns.
        ready = threading.Barrier(3)
        self.threads = [
            threading.Thread(target=self._run_tx, args=(ready,), name="pyflannel-tx",
                             daemon=True),
            threading.Thread(target=self._run_rx, args=(ready,), name="pyflannel-rx",
                             daemon=True),
        ]
        for thread in self.threads:
            thread.start()
        ready.wait()

    def _start_kernel_path(self):
        """Attach the tc programs (udp_tc) beside the loops, with the routes set so far. A host
        where they cannot run keeps the loops alone and says why in kernel_missing. With the
        kernel path off, a filter that a killed daemon left on the underlay is removed."""
        if not self.underlay:
            return
        underlay = socket.if_nametoindex(self.underlay)
        if self.kernel == "off":
            detach_underlay(underlay)
            return
        udp_tc = None
        layout6 = {} if self.table6 is None else {"ipv6_network": self.table6.network,
                                                  "ipv6_subnet_len": self.table6.subnet_len}
        try:
            udp_tc = UdpTc(self.table.network, self.table.subnet_len, self.bind_ip, self.port,
                           socket.if_nametoindex(self.tun_name), self.underlay,
                           verify_source=self.verify_source,
                           send_whole=self.whole_superpackets, loops_take_whole=self.offload,
                           receiver=self.vxlan_receiver, plain=self.plain_superpackets,
                           mtu=self.mtu, **layout6)
            kept = {name[len(KERNEL_PREFIX):]: self.handed.pop(name)
                    for name in list(self.handed) if name.startswith(KERNEL_PREFIX)}
            if not udp_tc.start(kept):  # a kept route map is the kept table's twin
                for table in (self.table, self.table6):
                    for subnet, (ip, port) in table.routes() if table is not None else ():
                        udp_tc.set_route(subnet, ip, port)
        except UdpTcUnavailable as err:
            if udp_tc is not None:
                udp_tc.stop()
            self.kernel_missing = str(err)
            self.kernel = "off"
            detach_underlay(underlay)
            return
        self.udp_tc = udp_tc

    def _prioritise(self, ready):
        """Give the calling packet thread the asked nice value (Linux nice is per thread). The
        kernel's own forwarding runs in softirq, ahead of every process; a packet thread that
        waits behind the applications it carries for lets a standing queue build meanwhile."""
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.nice)
            except OSError as err:
                self.nice_error = str(err)
        ready.wait()

    def _run_tx(self, ready):
        self._prioritise(ready)
        with nogil:
            pthread_setname_np(pthread_self(), "pyflannel-tx")
            tx_run(&self.tx)

    def _run_rx(self, ready):
        self._prioritise(ready)
        with nogil:
            pthread_setname_np(pthread_self(), "pyflannel-rx")
            rx_run(&self.rx)

    @staticmethod
    def resume(dict handed, **levers):
        """A FastPath started at once on the descriptors an earlier run kept (kept()), for the
        Network (and IPv6 Network), address, port, MTU and underlay they were made for, read
        back from them;
        `levers` as the constructor's. None when they are not all in `handed` or do not read
        back (`handed` is then left as it was; otherwise they are taken out of it)."""
        if not all(name in handed for name in KEPT):
            return None
        layout = kept_layout(handed["routes"])
        try:
            tun_name, mtu = tun_identity(handed["tun"])
            with socket.socket(fileno=os.dup(handed["socket"])) as sock:
                ip, port = sock.getsockname()[:2]
        except OSError:
            return None
        underlay = interface_with(ip)
        if layout is None or underlay is None:
            return None
        layout6 = kept_layout(handed[ROUTES6]) if ROUTES6 in handed else None
        if layout6 is not None:  # unless the levers say otherwise
            levers = {"ipv6_network": layout6[0], "ipv6_subnet_len": layout6[1], **levers}
        kept = {name: handed.pop(name) for name in KEPT_ANY if name in handed}
        fastpath = FastPath(layout[0], layout[1], ip, port, tun=tun_name, mtu=mtu,
                            underlay=underlay, handed=kept, **levers)
        fastpath.start()
        return fastpath

    def kept(self) -> dict:
        """The fds that let the next run go on where this one stops, by name (for `handed`):
        the TUN and the socket, whose queues hold what comes meanwhile, the route tables, and
        the kernel path's links and maps, which go on forwarding meanwhile. Nothing over outer
        IPv6: the next run starts afresh."""
        if self.outer6:  # its tables name peers by index into peers6, which no memfd holds
            return {}
        kept = dict(zip(KEPT, (self.tun_fd, self.sock.fileno(), self.table.fd), strict=True))
        if self.table6 is not None:
            kept[ROUTES6] = self.table6.fd
        if self.udp_tc is not None:
            kept.update((KERNEL_PREFIX + name, fd) for name, fd in self.udp_tc.kept().items())
        return kept

    def stop(self):
        """Stop both loops, wait for their threads and close the TUN (which removes it), the
        socket and the wake-up fd. Returns at once when not running; counters are kept."""
        if not self.threads:
            return
        pf_store(&self.stop_flag, 1)
        os.write(self.wake_fd, (1).to_bytes(8, sys.byteorder))
        for thread in self.threads:
            thread.join()
        self.threads = []
        self._close()

    def _close_handed(self):
        for fd in self.handed.values():
            os.close(fd)
        self.handed.clear()

    def _close(self):
        self._close_handed()  # handed over but not taken (start failed first)
        if self.udp_tc is not None:
            self.udp_tc.stop()
            self.udp_tc = None
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
            self.tun_fd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
        vector_free(&self.tx.vec)
        vector_free(&self.rx.vec)

    def stats(self) -> dict:
        """The loops' counters: {"tx": {...}, "rx": {...}}. tx counts TUN -> UDP, rx UDP -> TUN;
        batch_sizes counts wake-ups that moved 1, 2-3, 4-7, ... 128+ reads (tx) or datagrams
        (rx), batch_packets the reads or datagrams of them all (fastpath/loops.pxd says what
        each counter counts). With the kernel path, "kernel" has its counters
        (udp_tc.COUNTER_NAMES): what it carried never reaches the loops."""
        cdef TxCounters tx
        cdef RxCounters rx
        snapshot(<uint64_t *>&self.tx.counters, <uint64_t *>&tx, sizeof(TxCounters))
        snapshot(<uint64_t *>&self.rx.counters, <uint64_t *>&rx, sizeof(RxCounters))
        stats = {"tx": tx, "rx": rx}
        if self.udp_tc is not None:
            stats["kernel"] = self.udp_tc.counters()
        return stats

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
