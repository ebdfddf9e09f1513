// SPDX-License-Identifier: GPL-2.0
/* flannel's udp backend inside the kernel: two tc programs that carry the common case of the
 * fast path without waking a thread or copying a byte (and a third, vxlan_ingress, for peers'
 * whole super-packets: below).
 *
 *   tun_egress       (tc egress of flannel0)  IPv4 packet for a routed subnet -> one UDP
 *                    datagram to the peer's port, its payload the packet unchanged but for
 *                    the TTL, sent out of the underlay interface.
 *   udp_ingress (tc ingress of the underlay interface) such a datagram for our address
 *                    and port -> its packet, received on flannel0 as if the daemon had
 *                    written it into the TUN.
 *
 * The wire format is flanneld's: outer IPv4 (DF, TTL 64) + UDP from our port to the peer's.
 * The outer UDP checksum is left 0 (legal for IPv4, and what every receiver accepts): the
 * inner packet keeps its own checksums end to end.
 *
 * udp_ingress is safe with any peer: what it takes are flanneld's own datagrams. So is what
 * tun_egress sends. Behind a NIC, a TCP super-packet leaves as a UDP-tunnel super-packet that
 * the NIC (or the kernel's GSO in front of it) cuts into one datagram per segment, and
 * checksums the stack left to the hardware are filled in there. A veth does neither: it hands
 * both to the peer's stack as they are, where a flanneld socket would read one 64 KB datagram
 * or a TCP checksum never computed. So on a veth underlay super-packets go the loops' way (they
 * cut them), and so do the following packets of their flow for BULK_HOLD_NS, lest one overtake
 * those queued there; checksums are finished here.
 *
 * Except towards a peer that said it takes them: a pyflanneld whose loops write a datagram that
 * is one whole TCP super-packet into their TUN as it is (LOOPS_TAKE_WHOLE) says so with a hello
 * (below) every few seconds, and udp_ingress notes the sender in whole_peers. To such a peer,
 * with SEND_WHOLE (--fastpath-whole-superpackets), a TCP super-packet crosses the veth whole, as
 * kernel VXLAN's do. A flanneld never says hello, so it never gets one. The peer's udp_ingress
 * cannot simply decapsulate such a super-packet: a tc program cannot clear the kernel's
 * encapsulation mark (Linux 6.18 has no BPF_F_ADJ_ROOM_DECAP_L4_UDP), and with that
 * mark the bridge in front of the containers (whose hw_enc_features are none) cuts the packet
 * and sums its checksums in software, which measured slower than the loops. So it has the
 * kernel's own VXLAN receive take the headers off, which clears the mark:
 *
 *   udp_ingress    (THROUGH_VXLAN) turns the datagram into a VXLAN packet for the local
 *                  receive-only vxlan device (UDP port RX_VXLAN_PORT, VNI RX_VXLAN_VNI; made by
 *                  the control plane), marked by skb->priority = RX_PRIORITY;
 *   vxlan_ingress  (tc ingress of that device, a classic filter that outlives the daemon)
 *                  takes only what carries that mark, clears it and receives the super-packet
 *                  on flannel0, as udp_ingress does with any other packet. Anything else that
 *                  reaches the device's port, from any interface or process, is dropped: the
 *                  device is no second way into the overlay. The mark is the priority because
 *                  nothing between the two programs (netfilter's INPUT path, UDP, vxlan_rcv)
 *                  touches it, where the firewall mark is other software's to set.
 * Without THROUGH_VXLAN (no device, or the check in fastpath/udp_tc.py found that the handed
 * packets do not arrive, e.g. a firewall on the port) the loops write the super-packet into the
 * TUN as it is (LOOPS_TAKE_WHOLE), with two copies.
 *
 * That detour costs a pass through the kernel's VXLAN receive and one more queue (the redirect
 * into flannel0 from the device's ingress) than kernel VXLAN's own path. A peer on this same
 * kernel (network namespaces of one machine, where nothing on the way is a NIC) is spared it,
 * with PLAIN_SUPERPACKETS: tun_egress sends it the super-packet plain, outer headers put on by
 * bpf_skb_change_head, which leaves it a TCP super-packet with no encapsulation mark (and no
 * SKB_GSO_DODGY), and outer IP ID PLAIN_ID; its udp_ingress takes the headers off and receives
 * it on flannel0 like any small packet. Such a super-packet must never need cutting on the way
 * (a device with TSO off, a qdisc that cuts, as tbf and cake do): the kernel's GSO would read
 * the outer UDP header and drop it. So they go only where the underlay has no queueing
 * discipline that could (fastpath/udp_tc.py's CUTTING_QDISCS, looked at every 2 s), and to a
 * peer only
 *   - while it says, by a second hello (the kernel hello), that its kernel is ours (the boot ID)
 *     and how many of ours arrived;
 *   - after the first one sent it (the probe) arrived, which it says at once by the outer IP ID
 *     PLAIN_TAKEN on what it sends us for a while (TAKEN_MARK_NS), or in its next kernel hello:
 *     until then the others go marked, so a path that cuts them costs one super-packet;
 *   - until that count stops moving while we send: fastpath/udp_tc.py then refuses the peer
 *     plain ones for good (a device on the way that began to cut them).
 *
 * The hello is a datagram whose payload is an IPv4 packet with TTL 1, protocol HELLO_PROTOCOL
 * (RFC 3692's experimental 253) and HELLO_MAGIC as its payload, from the sender's subnet to the
 * receiver's. flanneld's proxy drops a packet whose TTL runs out without writing it to its TUN
 * (and says so only at -v 1), and so did pyflanneld's loops before they knew hellos.
 *
 * Everything unusual is passed on (TC_ACT_OK) to the daemon's own loops, which already handle
 * it: neither IPv4 nor IPv6, no route (ICMP net unreachable), TTL expiry (counted), malformed packets
 * (counted), fragments, datagrams merged by UDP GRO, a source that is not the sender's own
 * (dropped and counted, with verify_source). So a packet either takes this path or the
 * one it took before, and the counters below say how many took this one. A flow whose packets
 * udp_ingress left to the loops in bulk (merged datagrams, whole super-packets) keeps going
 * their way for BULK_HOLD_NS (loops_flows), as on the send side: a packet of it that took
 * this path would overtake those still queued for the loops.
 *
 * The route table has the layout of fastpath/table.pxd (one entry per subnet of the Network,
 * indexed by subnet number), written by the control plane while packets flow.
 *
 * IPv6 inside the overlay (flannel's IPv6Network; the loops' table6): routes6 holds the IPv6
 * subnets of pyflannel peers (a flanneld peer gets none: its proxy drops what is not IPv4).
 * tun_egress sends an IPv6 packet with TCP, UDP or ICMPv6 right behind its fixed header, for a
 * routed subnet, with hop limit above 1 and within the MTU, as one datagram like an IPv4 one
 * (outer IPv4 and UDP), its hop limit one lower; udp_ingress receives such a datagram from the
 * host that routes its source. The outer header changes the packet's family, which the kernel
 * reads from skb->protocol alone (bpf_redirect_neigh's route lookup, the receiving stack: either
 * drops a packet whose skb->protocol is the other family's). bpf_skb_adjust_room changes it only
 * with the ENCAP flags, which a veth must not get (see above), or the DECAP flags (Linux 6.3+).
 * So bpf_skb_change_proto (Linux 4.8) changes it on the way in, and on the way out over a veth
 * (elsewhere the ENCAP flags do, as for IPv4). It moves 20 bytes: 48 bytes of room made, 20
 * taken back, on the way out; 20 made, 48 taken off, on the way in. A TCP super-packet of
 * IPv6 (TSO6) goes plain to a peer that takes plain ones (plain_egress6: the same hellos, probe
 * and count as IPv4's, the peer's PLAIN_TAKEN on its IPv6 packets too); the peer's udp_ingress
 * changes its family back with the rest. Behind a NIC a TCP super-packet of IPv6 leaves as a
 * UDP-tunnel one (the ENCAP flags), as an IPv4 one does. Other super-packets of IPv6 (on a veth
 * there are no whole ones: the receive device is IPv4's), extension headers, fragments and the
 * rest go to the loops, and a flow that sent a super-packet there keeps going their way for
 * BULK_HOLD_NS.
 * The next-hop cache serves IPv6 routes too (next_hops6, keyed by the peer); a plain super-packet
 * of IPv6 takes the FIB's Ethernet header looked up for it.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define ENCAP_LEN (sizeof(struct iphdr) + sizeof(struct udphdr))
#define OUTER_TTL 64
#define IP_DF 0x4000
#define IP_FRAGMENT 0x3fff /* MF and the offset: any piece of a fragmented datagram */
#define BULK_HOLD_NS (100 * 1000 * 1000ULL)
#define CSUM_CHUNK 128
#define CSUM_CHUNKS 12 /* L4 lengths up to 1536 bytes: any MTU-sized packet */
#define NEXTHDR_ICMPV6 58
/* bpf_skb_change_proto's move: an IPv6 fixed header is this much longer than an IPv4 one. */
#define V6_V4_DIFF (sizeof(struct ipv6hdr) - sizeof(struct iphdr))

struct udp_tc_config {
	__be32 network;    /* the flannel Network, network byte order */
	__be32 netmask;
	__u32 shift;       /* 32 - SubnetLen */
	__u32 size;        /* subnets in the Network: entries in routes */
	__be32 local_ip;   /* our PublicIP: the outer source, and the address we receive on */
	__be16 port;       /* our UDP port: the outer source port, and the one we receive on */
	__u16 flags;       /* SEND_WHOLE, LOOPS_TAKE_WHOLE */
	__u32 underlay_ifindex;
	__u32 tun_ifindex;
	/* The underlay is a veth: what tun_egress sends reaches the peer's stack as it is. */
	__u32 underlay_is_veth;
	/* Take only packets whose source lies in the subnet routed to the datagram's sender; the
	 * loops drop the others and count them by reason. */
	__u32 verify_source;
	/* This kernel's boot ID (/proc/sys/kernel/random/boot_id), as kernel hellos carry it. */
	__u64 boot_id[2];
	/* The IPv6 Network (routes6), as fastpath/table.pxd's route_table6_t has it: host-order
	 * halves of the 128 bits, the high one first. size6 0: no IPv6 is carried here. */
	__u64 network6[2];
	__u64 netmask6[2];
	__u32 shift6;      /* 128 - IPv6SubnetLen */
	__u32 size6;       /* entries in routes6 */
	__u32 mtu;         /* flannel0's: a longer IPv6 packet is the loops' (packet too big) */
	__u32 pad;
	/* Which build of these programs the loader attached: a hash of this file's object, which a
	 * restart compares before it goes on with kept programs (fastpath/udp_tc.py). Unread here. */
	__u8 build[16];
};

/* On a veth underlay that carries GSO (TSO on): TCP super-packets go whole to whole_peers. */
#define SEND_WHOLE 1
/* The loops write a datagram that is one whole super-packet into the TUN as it is (offloads). */
#define LOOPS_TAKE_WHOLE 2
/* With LOOPS_TAKE_WHOLE: the local vxlan device takes such a datagram instead (see the top). */
#define THROUGH_VXLAN 4
/* With SEND_WHOLE: super-packets go plain to peers on this kernel (the top). */
#define PLAIN_SUPERPACKETS 8
/* The outer IP ID of a plain super-packet ("pf"; a DF datagram's ID means nothing, RFC 6864),
 * and of what goes back to its sender for TAKEN_MARK_NS after the first arrived ("pg"). */
#define PLAIN_ID 0x7066
#define PLAIN_TAKEN 0x7067
#define TAKEN_MARK_NS (1000 * 1000 * 1000ULL)

/* The receive-only vxlan device's port and VNI (fastpath/udp_tc.py's RX_VXLAN_*). The kernel
 * opens the port on every address: vxlan_ingress is what keeps it to udp_ingress's packets. */
#define RX_VXLAN_PORT 8473
#define RX_VXLAN_VNI 1
/* skb->priority of what udp_ingress hands the device: "pf" and 1. */
#define RX_PRIORITY 0x70660001
#define VXLAN_FLAG_VNI 0x08
#define RX_VXLAN_ROOM (sizeof(struct udphdr) + 8 + ETH_HLEN) /* UDP, VXLAN, inner Ethernet */

struct udp_tc_route {
	__be32 ip;         /* the peer's PublicIP; 0: no route */
	__be16 port;
	__u16 pad;
};

enum udp_tc_counter {
	TX_PACKETS, /* encapsulated and sent (a GSO super-packet counts as its segments) */
	TX_BYTES,   /* inner bytes of those */
	TX_PASSED,  /* IPv4 and IPv6 left to the daemon (no route, TTL, too long, super-packets
		     * of IPv6, extension headers) */
	RX_PACKETS, /* decapsulated and received on the TUN */
	RX_BYTES,
	RX_PASSED,  /* datagrams to our port left to the daemon (malformed, TTL, merged, fragments,
		     * a source that is not the sender's, whole super-packets the loops take) */
	TX_SUPERPACKETS, /* GSO super-packets among TX_PACKETS, sent whole to the underlay */
	RX_SUPERPACKETS, /* and among RX_PACKETS, received whole from a peer over a veth */
	RX_HELLOS,  /* peers' hellos, noted in whole_peers (from a foreign source: dropped only) */
	RX_VXLAN_HANDED,  /* whole super-packets among RX_PACKETS handed to the vxlan device */
	RX_VXLAN_ARRIVED, /* and how many of them vxlan_ingress received on flannel0 */
	RX_VXLAN_FOREIGN, /* what reached the vxlan device without the mark: dropped */
	RX_IN_ORDER, /* among RX_PASSED, datagrams left to the loops behind their flow's (loops_flows) */
	TX_PLAIN,   /* super-packets among TX_SUPERPACKETS sent plain (PLAIN_SUPERPACKETS) */
	RX_PLAIN,   /* plain super-packets that arrived, taken here or left to the loops */
	COUNTERS,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct udp_tc_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* sized to the Network by the loader */
	__type(key, __u32);
	__type(value, struct udp_tc_route);
} routes SEC(".maps");

/* The IPv6 Network's subnets, as routes: only pyflannel peers' (see the top). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* sized to the IPv6 Network by the loader */
	__type(key, __u32);
	__type(value, struct udp_tc_route);
} routes6 SEC(".maps");

/* What tun_egress found out about a peer, on one CPU, at most NEXT_HOP_CHECK_NS ago: the
 * Ethernet header of a frame to it out of the underlay (FIB lookup), and whether it said hello.
 * bpf_redirect_neigh looks up the route and the neighbour for every packet it sends, which
 * measured 1.5 % of a core at 10 Gbit/s; here only the packet that finds the entry due is sent
 * by bpf_redirect_neigh and looks again, and the rest go by bpf_redirect with the header found
 * (plain super-packets need it: their Ethernet header goes in with the outer ones). So
 * a peer's new MAC is followed within NEXT_HOP_CHECK_NS, and the kernel still sees our traffic
 * use the neighbour entry (that packet's), which keeps it probed and current as with every
 * packet. Indexed like routes; per CPU, so written without locks. */
#define NEXT_HOP_CHECK_NS (100 * 1000 * 1000ULL)
struct next_hop {
	__u64 checked;     /* bpf_ktime_get_ns() of the lookup */
	__be32 peer;       /* the PublicIP it was made for (the route may change) */
	__u8 resolved;     /* the FIB gave a neighbour on the underlay: eth holds it */
	__u8 said_hello;   /* said_hello(peer), as of checked */
	struct ethhdr eth; /* destination, source, ETH_P_IP */
	__u64 first_plain; /* the peer's first plain super-packet arrived then (0: none) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1); /* sized like routes by the loader */
	__type(key, __u32);
	__type(value, struct next_hop);
} next_hops SEC(".maps");

/* next_hops for the IPv6 routes, whose entries give no IPv4 subnet to index by: keyed by the
 * peer's PublicIP, the least used going when it is full (a packet that finds no entry then goes
 * by bpf_redirect_neigh, as it would without the cache). */
#define NEXT_HOPS6 1024
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, NEXT_HOPS6);
	__type(key, __be32);
	__type(value, struct next_hop);
} next_hops6 SEC(".maps");

struct flow {
	__be32 saddr;
	__be32 daddr;
	__be32 ports; /* source and destination port as they lie in the header */
	__u32 protocol;
};

/* Flows that sent a super-packet lately (veth underlay): when, in bpf_ktime_get_ns(). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow);
	__type(value, __u64);
} bulk_flows SEC(".maps");

/* Flows whose packets udp_ingress lately left to the loops in bulk, in a datagram that UDP GRO
 * merged from many or in a peer's whole super-packet: when, in bpf_ktime_get_ns(). Their next
 * datagrams go to the loops too for BULK_HOLD_NS (RX_IN_ORDER), lest one overtake those still
 * queued on the loops' socket: the receiving TCP takes the hole for a loss and the sender
 * retransmits for nothing (85-142 thousand retransmissions per 10 s of one TCP stream in the
 * `wire` regime of make perf, where UDP GRO merges most datagrams). loops_noted says when the
 * last one was noted, so that no other datagram looks a flow up while none is held. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow);
	__type(value, __u64);
} loops_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} loops_noted SEC(".maps");

/* The most inner packets of one merged datagram whose flows are noted (UDP GRO merges 64 at most). */
#define MERGED_MAX 64

/* The flow of the IPv4 packet whose header is `ip`, at `off` in the skb. */
static __always_inline void flow_of(struct __sk_buff *skb, const struct iphdr *ip, __u32 off,
				    struct flow *flow)
{
	flow->saddr = ip->saddr;
	flow->daddr = ip->daddr;
	flow->protocol = ip->protocol;
	flow->ports = 0;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP)
		bpf_skb_load_bytes(skb, off + ip->ihl * 4, &flow->ports, sizeof(flow->ports));
}

/* An IPv6 flow's key in the same maps: each address folded into 32 bits, the family in the
 * protocol. Two flows that fold alike share their hold, which only keeps one on the loops' way
 * longer: never out of order. */
#define FLOW_IPV6 0x100
static __always_inline __be32 fold6(const struct in6_addr *addr)
{
	return addr->in6_u.u6_addr32[0] ^ addr->in6_u.u6_addr32[1] ^ addr->in6_u.u6_addr32[2] ^
	       addr->in6_u.u6_addr32[3];
}

/* The flow of the IPv6 packet whose header is `ip`, at `off` in the skb. */
static __always_inline void flow_of6(struct __sk_buff *skb, const struct ipv6hdr *ip, __u32 off,
				     struct flow *flow)
{
	flow->saddr = fold6(&ip->saddr);
	flow->daddr = fold6(&ip->daddr);
	flow->protocol = FLOW_IPV6 | ip->nexthdr;
	flow->ports = 0;
	if (ip->nexthdr == IPPROTO_TCP || ip->nexthdr == IPPROTO_UDP)
		bpf_skb_load_bytes(skb, off + sizeof(*ip), &flow->ports, sizeof(flow->ports));
}

/* A flow held to one way (bulk_flows, loops_flows): when it last went that way. */
static __always_inline void hold_flow(void *flows, const struct flow *flow, __u64 now)
{
	__u64 *when = bpf_map_lookup_elem(flows, flow);

	if (when)
		*when = now;
	else
		bpf_map_update_elem(flows, flow, &now, BPF_ANY);
}

/* Whether the flow went that way less than BULK_HOLD_NS ago. */
static __always_inline int flow_held(void *flows, const struct flow *flow, __u64 now)
{
	__u64 *when = bpf_map_lookup_elem(flows, flow);

	return when && now - *when < BULK_HOLD_NS;
}

/* Peers that said hello lately, by PublicIP; times in bpf_ktime_get_ns(). A hello counts for
 * HELLO_VALID_NS: a peer that stops saying it (a flanneld took its place) stops getting whole
 * super-packets by then. The sender says it every HELLO_SECONDS (fastpath/hello.py), and with
 * PLAIN_SUPERPACKETS a kernel hello beside it. fastpath/udp_tc.py's PEER reads this. */
#define HELLO_PROTOCOL 253
#define HELLO_LEN 16
#define KERNEL_HELLO_LEN 40 /* magic, boot ID, a count */
#define HELLO_VALID_NS (7 * 1000 * 1000 * 1000ULL)
struct peer {
	__u64 hello;          /* when it last said it takes whole super-packets */
	__u64 same_kernel;    /* when it last said, by a kernel hello, that its kernel is ours */
	__u64 plain_sent;     /* plain super-packets sent to it */
	__u64 plain_taken;    /* how many of ours had arrived, says its last kernel hello */
	__u64 confirmed;      /* it said one of ours arrived: all go plain */
	__u64 plain_received; /* plain super-packets that arrived from it */
	__u64 first_plain;    /* when the first of them arrived */
	__u64 refused;        /* set by fastpath/udp_tc.py: its plain ones got lost; no more */
};
/* Peers that said hello: 8192 cover Kubernetes' supported 5,000 Nodes (least recently heard
 * ones go first past that). Preallocated, and charged to the daemon's memory cgroup, whose
 * DaemonSet limit is 50Mi: 65536 entries cost 8.50 MiB of it, 8192 cost 1.06 MiB
 * (docs/daemonset-limits.md). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __be32);
	__type(value, struct peer);
} whole_peers SEC(".maps");

/* "pyflannel-whole1" and "pyflannel-kernel" (fastpath/hello.py's HELLO_MAGIC, KERNEL_MAGIC) as
 * two words each in network byte order. */
#define HELLO_MAGIC_0 0x7079666c616e6e65ULL
#define HELLO_MAGIC_1 0x6c2d77686f6c6531ULL
#define KERNEL_MAGIC_1 0x6c2d6b65726e656cULL
#define WHOLE_HELLO 1
#define KERNEL_HELLO 2

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which, __u64 n)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &which);

	if (value)
		*value += n;
}

static __always_inline __u32 segments(struct __sk_buff *skb)
{
	return skb->gso_segs ? skb->gso_segs : 1;
}

/* RFC 1624 incremental update for a TTL decrement, as the kernel's ip_decrease_ttl. */
static __always_inline void decrement_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__sum16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

static __always_inline __sum16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *word = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += word[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

static __always_inline __u32 fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u32)((sum & 0xffff) + (sum >> 16));
}

/* The ones'-complement sum of the len bytes at off (an odd tail padded with zero, as RFC 1071
 * says), in the byte order they lie in; -1 if they cannot be read. */
static __always_inline __s64 sum_bytes(struct __sk_buff *skb, __u32 off, __u32 len)
{
	if (off > 60 || bpf_skb_pull_data(skb, off + len))
		return -1;
	__u8 *p = (void *)(long)skb->data + off;
	__u8 *end = (void *)(long)skb->data + off + len;
	__u8 *data_end = (void *)(long)skb->data_end;
	__u64 sum = 0;

	if (end > data_end)
		return -1;
	for (int i = 0; i < CSUM_CHUNKS; i++) {
		if (p + CSUM_CHUNK > end || p + CSUM_CHUNK > data_end)
			break;
		sum += (__u32)bpf_csum_diff(NULL, 0, (__be32 *)p, CSUM_CHUNK, 0);
		p += CSUM_CHUNK;
	}
	for (int i = 0; i < CSUM_CHUNK / 2; i++) {
		if (p + 2 > end || p + 2 > data_end)
			break;
		sum += *(__u16 *)p;
		p += 2;
	}
	if (p + 1 <= end && p + 1 <= data_end)
		sum += *p; /* the padded word's first byte, where a 16-bit load puts it */
	return fold(sum);
}

/* Fill in a TCP or UDP checksum that the stack left for hardware (CHECKSUM_PARTIAL: the field
 * holds the pseudo-header's sum); one that checks out is left alone. The others (ICMP, ICMPv6)
 * are summed in software, always complete: the callers leave them alone. `hl` is the network
 * header's length, `pseudo` the pseudo-header (its sum goes into the check). -1: cannot tell. */
static __always_inline int finish_l4_checksum(struct __sk_buff *skb, __u32 hl, __u32 l4_len,
					      __u8 protocol, void *pseudo, __u32 pseudo_len)
{
	__u32 field = hl + (protocol == IPPROTO_TCP ? offsetof(struct tcphdr, check) :
					     offsetof(struct udphdr, check));
	__u16 check;

	if (l4_len > CSUM_CHUNK * CSUM_CHUNKS)
		return -1;

	if (bpf_skb_load_bytes(skb, field, &check, sizeof(check)))
		return -1;
	if (protocol == IPPROTO_UDP && check == 0)
		return 0; /* sent without a checksum */
	__s64 data = sum_bytes(skb, hl, l4_len);

	if (data < 0)
		return -1;
	if (fold((__u64)data + (__u32)bpf_csum_diff(NULL, 0, pseudo, pseudo_len, 0)) == 0xffff)
		return 0;
	/* As the hardware would: the sum over the L4 bytes, the pseudo-header's in the field. */
	check = ~fold(data);
	if (protocol == IPPROTO_UDP && check == 0)
		check = 0xffff;
	return bpf_skb_store_bytes(skb, field, &check, sizeof(check), 0) ? -1 : 0;
}

/* finish_l4_checksum for an IPv4 packet (`ip` is gone once sum_bytes pulls the packet). */
static __always_inline int finish_checksum(struct __sk_buff *skb, struct iphdr *ip)
{
	__u32 hl = ip->ihl * 4;
	struct {
		__be32 saddr;
		__be32 daddr;
		__u8 zero;
		__u8 protocol;
		__be16 len;
	} pseudo = {ip->saddr, ip->daddr, 0, ip->protocol, bpf_htons(bpf_ntohs(ip->tot_len) - hl)};

	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(IP_FRAGMENT) || bpf_ntohs(ip->tot_len) != skb->len)
		return -1;
	return finish_l4_checksum(skb, hl, bpf_ntohs(ip->tot_len) - hl, ip->protocol, &pseudo,
				  sizeof(pseudo));
}

/* finish_l4_checksum for an IPv6 packet whose upper layer follows the fixed header. */
static __always_inline int finish_checksum6(struct __sk_buff *skb, struct ipv6hdr *ip)
{
	__u32 l4_len = bpf_ntohs(ip->payload_len);
	struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
		__be32 len;
		__u8 zero[3];
		__u8 nexthdr;
	} pseudo = {ip->saddr, ip->daddr, bpf_htonl(l4_len), {}, ip->nexthdr};

	if (ip->nexthdr != IPPROTO_TCP && ip->nexthdr != IPPROTO_UDP)
		return 0;
	if (l4_len + sizeof(*ip) != skb->len)
		return -1;
	return finish_l4_checksum(skb, sizeof(*ip), l4_len, ip->nexthdr, &pseudo, sizeof(pseudo));
}

/* On a veth underlay: whether this packet may go out as it is (see the top of this file). */
static __always_inline int fit_for_any_peer(struct __sk_buff *skb, struct iphdr *ip, __u64 now)
{
	struct flow flow;

	flow_of(skb, ip, 0, &flow);
	if (skb->gso_size) {
		hold_flow(&bulk_flows, &flow, now);
		return 0;
	}
	if (flow_held(&bulk_flows, &flow, now))
		return 0;
	return finish_checksum(skb, ip) == 0;
}

/* Whether a hello said `when` (0: never) still counts. */
static __always_inline int fresh(__u64 when, __u64 now)
{
	return when && now - when < HELLO_VALID_NS;
}

static __always_inline int said_hello(__be32 peer, __u64 now)
{
	struct peer *p = bpf_map_lookup_elem(&whole_peers, &peer);

	return p && fresh(p->hello, now);
}

/* The peer's entry, made (all zero) if it has none; NULL only if the map refuses. */
static __always_inline struct peer *peer_entry(__be32 ip)
{
	struct peer *p = bpf_map_lookup_elem(&whole_peers, &ip);

	if (p)
		return p;
	struct peer fresh = {};

	bpf_map_update_elem(&whole_peers, &ip, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&whole_peers, &ip);
}

/* The entry of a peer that takes plain super-packets now (the top), else NULL: confirmed, or
 * for the probe. */
static __always_inline struct peer *plain_peer(__be32 ip, __u64 now)
{
	struct peer *p = bpf_map_lookup_elem(&whole_peers, &ip);

	if (!p || !fresh(p->same_kernel, now) || p->refused)
		return NULL;
	return p->confirmed || !p->plain_sent ? p : NULL;
}

/* The Ethernet header of a frame to the peer at `route` out of the underlay, as the FIB gives
 * it: 1 when it names a neighbour there, else 0 (the caller sends by bpf_redirect_neigh). */
static __always_inline int fib_eth(struct __sk_buff *skb, const struct udp_tc_config *cfg,
				   const struct udp_tc_route *route, struct ethhdr *eth)
{
	struct bpf_fib_lookup fib = {
		.family = 2, /* AF_INET */
		.l4_protocol = IPPROTO_UDP,
		.sport = cfg->port,
		.dport = route->port,
		.ifindex = cfg->underlay_ifindex,
		.ipv4_src = cfg->local_ip,
		.ipv4_dst = route->ip,
	};
	int resolved = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) ==
		       BPF_FIB_LKUP_RET_SUCCESS && fib.ifindex == cfg->underlay_ifindex;

	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	return resolved;
}

/* `hop`, the cache's entry for the peer at `route`, when it is current and names a neighbour,
 * else NULL (the caller sends by bpf_redirect_neigh). An entry that is due is made again here. */
static __always_inline struct next_hop *current_hop(struct __sk_buff *skb,
						    const struct udp_tc_config *cfg,
						    struct next_hop *hop,
						    const struct udp_tc_route *route, __u64 now)
{
	if (!hop)
		return NULL;
	if (hop->peer == route->ip && now - hop->checked < NEXT_HOP_CHECK_NS)
		return hop->resolved ? hop : NULL;
	hop->resolved = fib_eth(skb, cfg, route, &hop->eth);
	struct peer *p = bpf_map_lookup_elem(&whole_peers, &route->ip);

	hop->said_hello = p && fresh(p->hello, now);
	hop->first_plain = p ? p->first_plain : 0;
	hop->peer = route->ip;
	hop->checked = now;
	return NULL;
}

/* current_hop for the IPv4 route at `key`. */
static __always_inline struct next_hop *next_hop(struct __sk_buff *skb,
						 const struct udp_tc_config *cfg, __u32 key,
						 const struct udp_tc_route *route, __u64 now)
{
	return current_hop(skb, cfg, bpf_map_lookup_elem(&next_hops, &key), route, now);
}

/* current_hop for an IPv6 route: its peer's entry in next_hops6, made (all zero) if it has none. */
static __always_inline struct next_hop *next_hop6(struct __sk_buff *skb,
						  const struct udp_tc_config *cfg,
						  const struct udp_tc_route *route, __u64 now)
{
	struct next_hop *hop = bpf_map_lookup_elem(&next_hops6, &route->ip);

	if (!hop) {
		struct next_hop fresh = {};

		bpf_map_update_elem(&next_hops6, &route->ip, &fresh, BPF_NOEXIST);
		hop = bpf_map_lookup_elem(&next_hops6, &route->ip);
	}
	return current_hop(skb, cfg, hop, route, now);
}

/* Which hello the inner packet at `inner` (IPv4, its header in the linear part) is: WHOLE_HELLO,
 * KERNEL_HELLO (its payload then in `kernel`), or none (0). */
static __always_inline int hello_kind(struct __sk_buff *skb, const struct iphdr *inner, __u32 off,
				      __u64 kernel[KERNEL_HELLO_LEN / 8])
{
	__u32 len = bpf_ntohs(inner->tot_len) - sizeof(*inner);

	if (inner->ttl != 1 || inner->protocol != HELLO_PROTOCOL || inner->ihl != 5)
		return 0;
	if (len == HELLO_LEN) {
		if (bpf_skb_load_bytes(skb, off + sizeof(*inner), kernel, HELLO_LEN))
			return 0;
		return kernel[0] == bpf_cpu_to_be64(HELLO_MAGIC_0) &&
		       kernel[1] == bpf_cpu_to_be64(HELLO_MAGIC_1) ? WHOLE_HELLO : 0;
	}
	if (len != KERNEL_HELLO_LEN ||
	    bpf_skb_load_bytes(skb, off + sizeof(*inner), kernel, KERNEL_HELLO_LEN))
		return 0;
	return kernel[0] == bpf_cpu_to_be64(HELLO_MAGIC_0) &&
	       kernel[1] == bpf_cpu_to_be64(KERNEL_MAGIC_1) ? KERNEL_HELLO : 0;
}

/* Note a peer's hello. A kernel hello counts only with our boot ID: a peer on another kernel
 * never gets plain super-packets. */
static __always_inline void note_hello(const struct udp_tc_config *cfg, __be32 sender, int kind,
				       const __u64 kernel[KERNEL_HELLO_LEN / 8])
{
	__u64 now = bpf_ktime_get_ns();

	if (kind == KERNEL_HELLO &&
	    (kernel[2] != cfg->boot_id[0] || kernel[3] != cfg->boot_id[1]))
		return;
	struct peer *p = peer_entry(sender);

	if (!p)
		return;
	if (kind == WHOLE_HELLO) {
		p->hello = now;
		return;
	}
	p->plain_taken = bpf_be64_to_cpu(kernel[4]);
	if (p->plain_taken)
		p->confirmed = 1;
	p->same_kernel = now;
}

/* Whether `source` lies in the subnet routed to `sender`: the one route lookup of the loops'
 * source check (fastpath/loops.pyx), which also counts what fails it. */
static __always_inline int senders_own(const struct udp_tc_config *cfg, __be32 source,
				       __be32 sender)
{
	if ((source & cfg->netmask) != cfg->network)
		return 0;
	__u32 key = (bpf_ntohl(source) - bpf_ntohl(cfg->network)) >> cfg->shift;
	struct udp_tc_route *route = bpf_map_lookup_elem(&routes, &key);

	return route && route->ip == sender;
}

/* The key in routes6 of an IPv6 address: its bits between the IPv6 Network's prefix and the
 * subnet length (fastpath/table.pxd's table_lookup6). 0 outside the IPv6 Network. */
static __always_inline int key6(const struct udp_tc_config *cfg, const struct in6_addr *addr,
				__u32 *key)
{
	__u64 hi = (__u64)bpf_ntohl(addr->in6_u.u6_addr32[0]) << 32 |
		   bpf_ntohl(addr->in6_u.u6_addr32[1]);
	__u64 lo = (__u64)bpf_ntohl(addr->in6_u.u6_addr32[2]) << 32 |
		   bpf_ntohl(addr->in6_u.u6_addr32[3]);
	__u32 shift = cfg->shift6;

	if (!cfg->size6 || (hi & cfg->netmask6[0]) != cfg->network6[0] ||
	    (lo & cfg->netmask6[1]) != cfg->network6[1])
		return 0;
	hi &= ~cfg->netmask6[0];
	lo &= ~cfg->netmask6[1];
	if (shift >= 64)
		*key = hi >> (shift - 64 & 63);
	else if (shift == 0)
		*key = lo; /* /128 subnets: at most 2^20, all in the low half */
	else
		*key = hi << (64 - shift) | lo >> shift;
	return 1;
}

/* senders_own for an IPv6 source: the loops' IPv6 source check. */
static __always_inline int senders_own6(const struct udp_tc_config *cfg,
					const struct in6_addr *source, __be32 sender)
{
	__u32 key;

	if (!key6(cfg, source, &key))
		return 0;
	struct udp_tc_route *route = bpf_map_lookup_elem(&routes6, &key);

	return route && route->ip == sender;
}

/* Whether the IPv6 packet's upper layer is one the kernel path carries: TCP, UDP or ICMPv6
 * right behind the fixed header (extension headers, fragments included, are the loops'). */
static __always_inline int carried6(const struct ipv6hdr *ip)
{
	return ip->nexthdr == IPPROTO_TCP || ip->nexthdr == IPPROTO_UDP ||
	       ip->nexthdr == NEXTHDR_ICMPV6;
}

/* The headers in front of a datagram's inner packet, written in one store. */
struct frame {
	__u16 align; /* puts ip on a 4-byte boundary */
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
};

/* The outer headers of a datagram to the peer at `peer`:`peer_port` carrying `inner_len` bytes
 * (flanneld's: DF, TTL 64, UDP checksum 0). */
static __always_inline void outer_headers(const struct udp_tc_config *cfg, __be32 peer,
					  __be16 peer_port, __u32 inner_len, __be16 id,
					  struct iphdr *ip, struct udphdr *udp)
{
	*ip = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(inner_len + ENCAP_LEN),
		.id = id,
		.frag_off = bpf_htons(IP_DF),
		.ttl = OUTER_TTL,
		.protocol = IPPROTO_UDP,
		.saddr = cfg->local_ip,
		.daddr = peer,
	};
	ip->check = ip_checksum(ip);
	*udp = (struct udphdr){
		.source = cfg->port,
		.dest = peer_port,
		.len = bpf_htons(inner_len + sizeof(struct udphdr)),
	};
}

/* Write the frame's headers in front of the packet: with the next hop's Ethernet header, else
 * the outer ones alone (bpf_redirect_neigh fills in the rest). Non-zero if they cannot be. */
static __always_inline int store_frame(struct __sk_buff *skb, const struct next_hop *hop,
				       struct frame *frame)
{
	if (!hop)
		return bpf_skb_store_bytes(skb, ETH_HLEN, &frame->ip, ENCAP_LEN, 0);
	__builtin_memcpy(&frame->eth, &hop->eth, sizeof(frame->eth));
	return bpf_skb_store_bytes(skb, 0, &frame->eth, ETH_HLEN + ENCAP_LEN, 0);
}

/* Out of the underlay: to the next hop found, else the kernel finds the next hop to the peer
 * and its MAC, as for any packet it routes. */
static __always_inline int send_out(const struct udp_tc_config *cfg, const struct next_hop *hop)
{
	return hop ? bpf_redirect(cfg->underlay_ifindex, 0) :
		     bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* The config, for an IPv4 packet whose first `headers` bytes are now in the linear part; NULL
 * for anything else (the programs then leave the packet alone). */
static __always_inline struct udp_tc_config *ipv4_config(struct __sk_buff *skb, __u32 headers)
{
	__u32 key = 0;
	struct udp_tc_config *cfg = bpf_map_lookup_elem(&config, &key);

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_pull_data(skb, headers))
		return NULL;
	return cfg;
}

/* A TCP/IPv6 super-packet plain to a peer on this kernel (see the top): as tun_egress's plain
 * ones, all the headers put in front by bpf_skb_change_head (the super-packet's own offsets and
 * type untouched, skb->protocol left IPv6's: the receiving veth reads the family from the
 * Ethernet header, and the peer's udp_ingress changes it back), the Ethernet header the FIB's.
 * Where the FIB names no neighbour on the underlay, the loops take it. */
static __always_inline int plain_egress6(struct __sk_buff *skb, const struct udp_tc_config *cfg,
					 const struct udp_tc_route *route, struct peer *plain,
					 __u8 hop_limit)
{
	struct frame frame;
	__u32 inner_len = skb->len;
	__u32 packets = segments(skb);

	if (!fib_eth(skb, cfg, route, &frame.eth)) {
		count(TX_PASSED, 1);
		return TC_ACT_OK;
	}
	outer_headers(cfg, route->ip, route->port, inner_len, bpf_htons(PLAIN_ID), &frame.ip,
		      &frame.udp);
	if (bpf_skb_store_bytes(skb, offsetof(struct ipv6hdr, hop_limit), &hop_limit,
				sizeof(hop_limit), 0) ||
	    bpf_skb_change_head(skb, ETH_HLEN + ENCAP_LEN, 0) ||
	    bpf_skb_store_bytes(skb, 0, &frame.eth, ETH_HLEN + ENCAP_LEN, 0))
		return TC_ACT_SHOT; /* hop limit already spent: no second path for this one */
	count(TX_PACKETS, packets);
	count(TX_SUPERPACKETS, 1);
	count(TX_BYTES, inner_len);
	__sync_fetch_and_add(&plain->plain_sent, 1);
	count(TX_PLAIN, 1);
	return bpf_redirect(cfg->underlay_ifindex, 0);
}

/* tun_egress for an IPv6 packet (see the top). */
static __always_inline int tun_egress6(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct udp_tc_config *cfg = bpf_map_lookup_elem(&config, &key);

	if (!cfg || !cfg->size6 || bpf_skb_pull_data(skb, sizeof(struct ipv6hdr)))
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *inner = data;

	if ((void *)(inner + 1) > data_end || inner->version != 6 || !key6(cfg, &inner->daddr, &key))
		return TC_ACT_OK;
	struct udp_tc_route *route = bpf_map_lookup_elem(&routes6, &key);
	/* As for IPv4: the loops answer no route and an expiring hop limit. */
	if (!route || !route->ip || inner->hop_limit <= 1 || !carried6(inner)) {
		count(TX_PASSED, 1);
		return TC_ACT_OK;
	}
	__u64 now = bpf_ktime_get_ns();
	struct flow flow;

	if (skb->gso_size && inner->nexthdr == IPPROTO_TCP && cfg->underlay_is_veth &&
	    (cfg->flags & (SEND_WHOLE | PLAIN_SUPERPACKETS)) == (SEND_WHOLE | PLAIN_SUPERPACKETS) &&
	    skb->len + ENCAP_LEN <= 0xFFFF) {
		struct peer *plain = plain_peer(route->ip, now);

		if (plain && fresh(plain->hello, now))
			return plain_egress6(skb, cfg, route, plain, inner->hop_limit - 1);
	}
	/* Behind a NIC a TCP super-packet leaves as a UDP-tunnel one, as an IPv4 one does (below).
	 * Any other goes to the loops, which cut it, and its flow after it for BULK_HOLD_NS. One
	 * over the MTU gets the loops' packet too big. */
	int tunnelled = skb->gso_size && !cfg->underlay_is_veth && inner->nexthdr == IPPROTO_TCP &&
			skb->len + ENCAP_LEN <= 0xFFFF;

	flow_of6(skb, inner, 0, &flow);
	if (skb->gso_size && !tunnelled)
		hold_flow(&bulk_flows, &flow, now);
	if ((skb->gso_size && !tunnelled) || (!skb->gso_size && skb->len > cfg->mtu) ||
	    flow_held(&bulk_flows, &flow, now) ||
	    (cfg->underlay_is_veth && finish_checksum6(skb, inner))) {
		count(TX_PASSED, 1);
		return TC_ACT_OK;
	}
	__be32 peer = route->ip;
	__be16 peer_port = route->port;
	__u32 inner_len = skb->len;
	__u32 packets = segments(skb);
	/* The peer's first plain super-packet arrived lately: say so (PLAIN_TAKEN), as tun_egress
	 * does from its next hop. */
	struct peer *p = cfg->flags & PLAIN_SUPERPACKETS ?
				 bpf_map_lookup_elem(&whole_peers, &route->ip) : NULL;
	__be16 id = p && p->first_plain && now - p->first_plain < TAKEN_MARK_NS ?
			    bpf_htons(PLAIN_TAKEN) : 0;
	struct next_hop *hop = next_hop6(skb, cfg, route, now);

	/* finishing a checksum may have moved the packet */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	inner = data;
	if ((void *)(inner + 1) > data_end)
		return TC_ACT_OK;
	inner->hop_limit--;
	/* Room for the outer headers, and skb->protocol IPv4's (see the top): on a veth without
	 * the ENCAP flags' mark, so by bpf_skb_change_proto; elsewhere by the ENCAP flags, with
	 * which the device (or the kernel in front of it) finishes the inner checksum. */
	if (cfg->underlay_is_veth ?
	    bpf_skb_adjust_room(skb, ENCAP_LEN + V6_V4_DIFF, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO) ||
	    bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0) :
	    bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return TC_ACT_SHOT; /* hop limit already spent: no second path for this one */
	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return TC_ACT_SHOT;
	struct frame frame;

	outer_headers(cfg, peer, peer_port, inner_len, id, &frame.ip, &frame.udp);
	if (store_frame(skb, hop, &frame))
		return TC_ACT_SHOT;
	count(TX_PACKETS, packets);
	if (packets > 1)
		count(TX_SUPERPACKETS, 1);
	count(TX_BYTES, inner_len);
	return send_out(cfg, hop);
}

SEC("tc")
int tun_egress(struct __sk_buff *skb)
{
	struct udp_tc_config *cfg = ipv4_config(skb, sizeof(struct iphdr));
	__u32 key;

	if (!cfg)
		return skb->protocol == bpf_htons(ETH_P_IPV6) ? tun_egress6(skb) : TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *inner = data;

	if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5)
		return TC_ACT_OK;
	if ((inner->daddr & cfg->netmask) != cfg->network)
		return TC_ACT_OK;
	key = (bpf_ntohl(inner->daddr) - bpf_ntohl(cfg->network)) >> cfg->shift;
	struct udp_tc_route *route = bpf_map_lookup_elem(&routes, &key);
	/* No route: the daemon answers ICMP net unreachable. TTL 1: it answers time exceeded. A
	 * length the outer header cannot carry goes the daemon's way too (it splits super-packets). */
	if (!route || !route->ip || inner->ttl <= 1 || skb->len + ENCAP_LEN > 0xFFFF) {
		count(TX_PASSED, 1);
		return TC_ACT_OK;
	}
	__u64 now = bpf_ktime_get_ns();
	struct next_hop *hop = next_hop(skb, cfg, key, route, now);
	/* Sent whole over a veth: a TCP super-packet to a peer that said it takes them. The next
	 * hop found on this CPU may predate the peer's first hello by up to NEXT_HOP_CHECK_NS:
	 * where it says no, the peer's entry says. (A super-packet that goes the loops' way holds
	 * its flow there for BULK_HOLD_NS, lost if no daemon runs: a restart with the kernel path
	 * pinned.) */
	int whole = cfg->underlay_is_veth && skb->gso_size && (cfg->flags & SEND_WHOLE) &&
		    inner->protocol == IPPROTO_TCP &&
		    ((hop && hop->said_hello) || said_hello(route->ip, now));

	/* hop: plain ones go by the next hop, whose Ethernet header goes in with the others (the
	 * packet that looks it up again goes marked, by bpf_redirect_neigh, as any other does) */
	struct peer *plain = whole && hop && (cfg->flags & PLAIN_SUPERPACKETS) ?
				     plain_peer(route->ip, now) : NULL;

	if (cfg->underlay_is_veth && !whole) {
		if (!fit_for_any_peer(skb, inner, now)) {
			count(TX_PASSED, 1);
			return TC_ACT_OK;
		}
		/* finishing a checksum may have moved the packet */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		inner = data;
		if ((void *)(inner + 1) > data_end)
			return TC_ACT_OK;
	}
	__be32 peer = route->ip;
	__be16 peer_port = route->port;
	__u32 inner_len = skb->len;
	__u32 packets = segments(skb);

	decrement_ttl(inner);
	if (plain) {
		/* All the headers in front, the super-packet's own offsets and type untouched. */
		if (bpf_skb_change_head(skb, ETH_HLEN + ENCAP_LEN, 0))
			return TC_ACT_SHOT; /* TTL already spent: no second path for this one */
	} else {
		/* FIXED_GSO: the inner MSS stays what TCP chose for flannel0's MTU, which already
		 * leaves room for these 28 bytes. The ENCAP flags make a super-packet a UDP-tunnel
		 * one, cut by the underlay's device (or its GSO) into datagrams each carrying one
		 * whole inner packet. On a veth only a whole super-packet gets here, and the ENCAP
		 * flags would mark any other packet as encapsulated for good: the peer's kernel path
		 * takes the outer header off but not that mark, and its bridge would then compute
		 * again a checksum finished above. */
		if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
					cfg->underlay_is_veth && !whole ? BPF_F_ADJ_ROOM_FIXED_GSO :
					BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
			return TC_ACT_SHOT;
		/* Room for the Ethernet header: ours, or the one bpf_redirect_neigh fills in. */
		if (bpf_skb_change_head(skb, ETH_HLEN, 0))
			return TC_ACT_SHOT;
	}

	struct frame frame;

	outer_headers(cfg, peer, peer_port, inner_len,
		      plain ? bpf_htons(PLAIN_ID) :
		      hop && hop->first_plain && now - hop->first_plain < TAKEN_MARK_NS ?
		      bpf_htons(PLAIN_TAKEN) : 0, &frame.ip, &frame.udp);
	if (store_frame(skb, hop, &frame))
		return TC_ACT_SHOT;
	count(TX_PACKETS, packets);
	if (packets > 1)
		count(TX_SUPERPACKETS, 1);
	count(TX_BYTES, inner_len);
	if (plain) {
		__sync_fetch_and_add(&plain->plain_sent, 1);
		count(TX_PLAIN, 1);
	}
	return send_out(cfg, hop);
}

static __always_inline void count_received(__u32 packets, __u32 inner_len)
{
	count(RX_PACKETS, packets);
	if (packets > 1)
		count(RX_SUPERPACKETS, 1);
	count(RX_BYTES, inner_len);
}

/* Our datagram that is one whole super-packet (its TTL already spent) -> the same datagram
 * made a VXLAN packet to the local vxlan device: room after the outer IPv4 header for the VXLAN
 * and inner Ethernet headers, and a UDP header to RX_VXLAN_PORT in front of them. The inner
 * Ethernet addresses are zero: vxlan_rcv checks only that the source is not the device's own
 * MAC, and vxlan_ingress takes the frame off again. FIXED_GSO keeps the segment size. */
static __always_inline int through_vxlan(struct __sk_buff *skb, __u32 inner_len, __u32 packets)
{
	struct {
		struct udphdr udp;
		__u8 vxlan[8];
		struct ethhdr eth;
	} __attribute__((packed)) headers = {
		.udp = {
			.source = bpf_htons(RX_VXLAN_PORT),
			.dest = bpf_htons(RX_VXLAN_PORT),
			.len = bpf_htons(RX_VXLAN_ROOM + inner_len),
		},
		.vxlan = {VXLAN_FLAG_VNI, 0, 0, 0, RX_VXLAN_VNI >> 16, (RX_VXLAN_VNI >> 8) & 0xff,
			  RX_VXLAN_VNI & 0xff, 0},
		.eth = {.h_proto = bpf_htons(ETH_P_IP)},
	};
	struct iphdr outer;

	if (bpf_skb_adjust_room(skb, RX_VXLAN_ROOM - sizeof(struct udphdr), BPF_ADJ_ROOM_NET,
				BPF_F_ADJ_ROOM_FIXED_GSO) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(outer), &headers, sizeof(headers), 0) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)))
		return TC_ACT_SHOT; /* TTL already spent: no second path for this one */
	outer.tot_len = bpf_htons(sizeof(outer) + RX_VXLAN_ROOM + inner_len);
	outer.check = 0;
	outer.check = ip_checksum(&outer);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0))
		return TC_ACT_SHOT;
	skb->priority = RX_PRIORITY;
	count_received(packets, inner_len);
	count(RX_VXLAN_HANDED, 1);
	return TC_ACT_OK;
}

/* The flow of the inner IPv4 or IPv6 packet at `off`; 0 if there is none there. */
static __always_inline int inner_flow(struct __sk_buff *skb, __u32 off, struct flow *flow)
{
	struct iphdr ip;
	struct ipv6hdr ip6;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
		return 0;
	if (ip.version == 4 && ip.ihl >= 5) {
		flow_of(skb, &ip, off, flow);
		return 1;
	}
	if (ip.version != 6 || bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return 0;
	flow_of6(skb, &ip6, off, flow);
	return 1;
}

/* The datagram goes to the loops in bulk: note the flows of its inner packets, one after the
 * other `step` bytes apart (a merged datagram's segment size; a whole super-packet's length,
 * as it is one). */
static __always_inline void note_loops_flows(struct __sk_buff *skb, __u32 step)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 key = 0;
	__u64 *noted = bpf_map_lookup_elem(&loops_noted, &key);
	struct flow last = {}, flow = {};

	if (noted)
		*noted = now;
	for (__u32 i = 0, off = ETH_HLEN + ENCAP_LEN; i < MERGED_MAX && off < skb->len;
	     i++, off += step) {
		if (!inner_flow(skb, off, &flow))
			break;
		if (i && flow.saddr == last.saddr && flow.daddr == last.daddr &&
		    flow.ports == last.ports && flow.protocol == last.protocol)
			continue; /* mostly one flow after the other: noted once */
		hold_flow(&loops_flows, &flow, now);
		last = flow;
	}
}

/* Whether loops_flows may hold a flow now: one was noted less than BULK_HOLD_NS ago. */
static __always_inline int loops_holding(__u64 now)
{
	__u32 key = 0;
	__u64 *noted = bpf_map_lookup_elem(&loops_noted, &key);

	return noted && now - *noted < BULK_HOLD_NS;
}

/* Whether the datagram's inner packet (IPv4 or IPv6), whose header udp_ingress has checked,
 * belongs to a flow that loops_flows holds. Its flow is read only while one may be held. */
static __always_inline int behind_loops(struct __sk_buff *skb)
{
	__u64 now = bpf_ktime_get_ns();
	struct flow flow;

	return loops_holding(now) && inner_flow(skb, ETH_HLEN + ENCAP_LEN, &flow) &&
	       flow_held(&loops_flows, &flow, now);
}

/* The first plain super-packet from the peer at `sender` (its inner source `source`) arrived:
 * say so on what goes back to it from now on (PLAIN_TAKEN), from this CPU's next hop at once
 * (the ACK of that super-packet leaves from here), from the others' when they look again. */
static __always_inline void note_first_plain(const struct udp_tc_config *cfg, struct peer *p,
					     __be32 source, __be32 sender)
{
	p->first_plain = bpf_ktime_get_ns();
	if ((source & cfg->netmask) != cfg->network)
		return;
	__u32 key = (bpf_ntohl(source) - bpf_ntohl(cfg->network)) >> cfg->shift;
	struct next_hop *hop = bpf_map_lookup_elem(&next_hops, &key);

	if (hop && hop->peer == sender)
		hop->first_plain = p->first_plain;
}

/* A plain super-packet from the peer at `sender` arrived (its inner IPv4 source `source`; 0 for
 * an IPv6 one): the peer hears it from our kernel hellos, and at once by PLAIN_TAKEN. */
static __always_inline void note_plain(const struct udp_tc_config *cfg, __be32 sender,
				       __be32 source)
{
	struct peer *p = peer_entry(sender);

	if (p) {
		if (!p->first_plain)
			note_first_plain(cfg, p, source, sender);
		__sync_fetch_and_add(&p->plain_received, 1);
	}
	count(RX_PLAIN, 1);
}

/* The peer at `sender` says our probe arrived (the top), by the outer IP ID PLAIN_TAKEN. */
static __always_inline void note_taken(__be32 sender)
{
	struct peer *p = bpf_map_lookup_elem(&whole_peers, &sender);

	if (p && !p->confirmed)
		p->confirmed = 1;
}

/* udp_ingress for a datagram whose inner packet is IPv6 (see the top). */
static __always_inline int udp_ingress6(struct __sk_buff *skb, const struct udp_tc_config *cfg,
					__be32 sender, __be16 outer_id)
{
	if (!cfg->size6 || bpf_skb_pull_data(skb, ETH_HLEN + ENCAP_LEN + sizeof(struct ipv6hdr))) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *inner = data + ETH_HLEN + ENCAP_LEN;
	__u32 inner_len = skb->len - ETH_HLEN - ENCAP_LEN;

	if ((void *)(inner + 1) > data_end) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	/* As for IPv4: what UDP GRO merged goes to the loops, and its flows after it. No peer
	 * sends IPv6 super-packets whole: any that comes is the loops' too. */
	if (bpf_ntohs(inner->payload_len) + sizeof(*inner) != inner_len) {
		if (skb->gso_size)
			note_loops_flows(skb, skb->gso_size);
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	/* A peer's plain super-packet (see the top) is taken in as any packet, and never held
	 * behind the loops (whose socket could not take it in). The loops drop one over the MTU
	 * (flannel0's, which IPv6 does not fragment). */
	int plain = skb->gso_size && outer_id == bpf_htons(PLAIN_ID) &&
		    inner->nexthdr == IPPROTO_TCP;

	if ((skb->gso_size && !plain) || inner->hop_limit <= 1 || !carried6(inner) ||
	    (!plain && inner_len > cfg->mtu)) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	if (!plain && behind_loops(skb)) {
		count(RX_PASSED, 1);
		count(RX_IN_ORDER, 1);
		return TC_ACT_OK;
	}
	if (cfg->verify_source && !senders_own6(cfg, &inner->saddr, sender)) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	__u8 hop_limit = inner->hop_limit - 1;
	__u32 packets = segments(skb);

	if (plain) {
		note_plain(cfg, sender, 0);
	} else if (outer_id == bpf_htons(PLAIN_TAKEN)) {
		note_taken(sender);
	}

	/* skb->protocol IPv6's (see the top): 20 bytes made by bpf_skb_change_proto, then those
	 * and the outer headers taken off. The hop limit is stored with the checksum a NIC gave
	 * for the whole packet (CHECKSUM_COMPLETE) kept right. */
	if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0) ||
	    bpf_skb_adjust_room(skb, -(__s32)(ENCAP_LEN + V6_V4_DIFF), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, hop_limit), &hop_limit,
				sizeof(hop_limit), BPF_F_RECOMPUTE_CSUM))
		return TC_ACT_SHOT;
	count_received(packets, inner_len);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

SEC("tc")
int udp_ingress(struct __sk_buff *skb)
{
	struct udp_tc_config *cfg = ipv4_config(skb, ETH_HLEN + ENCAP_LEN + sizeof(struct iphdr));

	if (!cfg)
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *outer = data + ETH_HLEN;
	struct udphdr *udp = (void *)(outer + 1);
	struct iphdr *inner = (void *)(udp + 1);

	if ((void *)(inner + 1) > data_end)
		return TC_ACT_OK;
	if (outer->version != 4 || outer->ihl != 5 || outer->protocol != IPPROTO_UDP ||
	    outer->daddr != cfg->local_ip || udp->dest != cfg->port)
		return TC_ACT_OK;
	/* Ours from here on. A fragment needs the kernel's reassembly; a datagram that is not one
	 * whole IPv4 packet is the daemon's to count as malformed. The length check also sends
	 * the daemon what UDP GRO merged (many datagrams, whose first packet is shorter than the
	 * whole), while a UDP-tunnel super-packet from a peer's tun_egress carries one inner
	 * packet that is as long as the whole. */
	__be32 sender = outer->saddr;
	__u64 hello[KERNEL_HELLO_LEN / 8];
	int hello_of = !(outer->frag_off & bpf_htons(IP_FRAGMENT)) && inner->version == 4 ?
			       hello_kind(skb, inner, ETH_HLEN + ENCAP_LEN, hello) : 0;

	if (hello_of) {
		/* From the sender's own subnet, as any packet of its (verify_source). */
		if (!cfg->verify_source || senders_own(cfg, inner->saddr, sender))
			note_hello(cfg, sender, hello_of, hello);
		count(RX_HELLOS, 1);
		return TC_ACT_SHOT;
	}
	if (outer->frag_off & bpf_htons(IP_FRAGMENT) || inner->version != 4 || inner->ihl < 5 ||
	    inner->ttl <= 1) {
		if (!(outer->frag_off & bpf_htons(IP_FRAGMENT)) && inner->version == 6)
			return udp_ingress6(skb, cfg, sender, outer->id);
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	if (bpf_ntohs(inner->tot_len) != skb->len - ETH_HLEN - ENCAP_LEN) {
		/* Many datagrams that UDP GRO merged into one (or a malformed one) */
		if (skb->gso_size)
			note_loops_flows(skb, skb->gso_size);
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	/* A peer's plain super-packet (see the top): taken in here as any packet. It arrived, which
	 * the peer hears from our kernel hellos, wherever it goes from here. */
	int plain = skb->gso_size && outer->id == bpf_htons(PLAIN_ID);

	if (plain) {
		note_plain(cfg, sender, inner->saddr);
	} else if (outer->id == bpf_htons(PLAIN_TAKEN)) {
		note_taken(sender);
	}
	/* A peer's whole super-packet: the loops write it into the TUN as it is (see the top). */
	int whole = !plain && skb->gso_size && (cfg->flags & LOOPS_TAKE_WHOLE);

	if (whole && !(cfg->flags & THROUGH_VXLAN)) {
		note_loops_flows(skb, skb->len);
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	/* A plain one held here reaches the loops' socket whole (UDP_GRO), and the loops write it
	 * into the TUN as they do a whole one. */
	if (!whole && behind_loops(skb)) {
		count(RX_PASSED, 1);
		count(RX_IN_ORDER, 1);
		return TC_ACT_OK;
	}
	if (cfg->verify_source && !senders_own(cfg, inner->saddr, outer->saddr)) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	__u32 inner_len = skb->len - ETH_HLEN - ENCAP_LEN;
	__u32 packets = segments(skb);

	decrement_ttl(inner);
	if (whole)
		return through_vxlan(skb, inner_len, packets);
	if (bpf_skb_adjust_room(skb, -(__s32)ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_SHOT;
	count_received(packets, inner_len);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

SEC("tc")
int vxlan_ingress(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct udp_tc_config *cfg = bpf_map_lookup_elem(&config, &key);

	if (!cfg || skb->priority != RX_PRIORITY) {
		count(RX_VXLAN_FOREIGN, 1);
		return TC_ACT_SHOT;
	}
	skb->priority = 0;
	count(RX_VXLAN_ARRIVED, 1);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
