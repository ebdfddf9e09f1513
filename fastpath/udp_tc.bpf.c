// SPDX-License-Identifier: GPL-2.0
/* flannel's udp backend inside the kernel: two tc programs that carry the common case of the
 * fast path without waking a thread or copying a byte.
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
 * udp_ingress is safe with any peer: what it takes are flanneld's own datagrams. What
 * tun_egress sends is too, once a NIC has finished it: a TCP super-packet leaves as a
 * UDP-tunnel super-packet that the NIC (or the kernel's GSO in front of it) cuts into one
 * datagram per segment, and checksums the stack left to the hardware are filled in there. A
 * veth finishes neither: it hands both to the peer's stack as they are, where only another
 * udp_ingress takes them (flanneld's socket would read a 64 KB datagram, or a TCP
 * checksum never computed). So the daemon attaches tun_egress only when told to (mode "on").
 *
 * Everything unusual is passed on (TC_ACT_OK) to the daemon's own loops, which already handle
 * it: non-IPv4, no route (ICMP net unreachable), TTL expiry (counted), malformed packets
 * (counted), fragments, datagrams merged by UDP GRO. So a packet either takes this path or the
 * one it took before, and the counters below say how many took this one.
 *
 * The route table has the layout of fastpath/table.pxd (one entry per subnet of the Network,
 * indexed by subnet number), written by the control plane while packets flow.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define ENCAP_LEN (sizeof(struct iphdr) + sizeof(struct udphdr))
#define OUTER_TTL 64
#define IP_DF 0x4000
#define IP_FRAGMENT 0x3fff /* MF and the offset: any piece of a fragmented datagram */

struct udp_tc_config {
	__be32 network;    /* the flannel Network, network byte order */
	__be32 netmask;
	__u32 shift;       /* 32 - SubnetLen */
	__u32 size;        /* subnets in the Network: entries in routes */
	__be32 local_ip;   /* our PublicIP: the outer source, and the address we receive on */
	__be16 port;       /* our UDP port: the outer source port, and the one we receive on */
	__u16 pad;
	__u32 underlay_ifindex;
	__u32 tun_ifindex;
};

struct udp_tc_route {
	__be32 ip;         /* the peer's PublicIP; 0: no route */
	__be16 port;
	__u16 pad;
};

enum udp_tc_counter {
	TX_PACKETS, /* encapsulated and sent (a GSO super-packet counts as its segments) */
	TX_BYTES,   /* inner bytes of those */
	TX_PASSED,  /* IPv4 left to the daemon (no route, TTL, too long) */
	RX_PACKETS, /* decapsulated and received on the TUN */
	RX_BYTES,
	RX_PASSED,  /* datagrams to our port left to the daemon (malformed, TTL, merged, fragments) */
	TX_SUPERPACKETS, /* GSO super-packets among TX_PACKETS, sent whole to the underlay */
	RX_SUPERPACKETS, /* and among RX_PACKETS, received whole from a peer over a veth */
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

SEC("tc")
int tun_egress(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct udp_tc_config *cfg = bpf_map_lookup_elem(&config, &key);

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_pull_data(skb, sizeof(struct iphdr)))
		return TC_ACT_OK;

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
	__be32 peer = route->ip;
	__be16 peer_port = route->port;
	__u32 inner_len = skb->len;
	__u32 packets = segments(skb);

	decrement_ttl(inner);
	/* FIXED_GSO: the inner MSS stays what TCP chose for flannel0's MTU, which already leaves
	 * room for these 28 bytes. The ENCAP flags make a super-packet a UDP-tunnel one, cut by
	 * the underlay's device (or its GSO) into datagrams each carrying one whole inner packet. */
	if (bpf_skb_adjust_room(skb, ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return TC_ACT_SHOT; /* TTL already spent: no second path for this one */
	/* bpf_redirect_neigh takes frames: room for the Ethernet header it fills in. */
	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return TC_ACT_SHOT;

	struct {
		struct iphdr ip;
		struct udphdr udp;
	} outer = {
		.ip = {
			.version = 4,
			.ihl = 5,
			.tot_len = bpf_htons(inner_len + ENCAP_LEN),
			.frag_off = bpf_htons(IP_DF),
			.ttl = OUTER_TTL,
			.protocol = IPPROTO_UDP,
			.saddr = cfg->local_ip,
			.daddr = peer,
		},
		.udp = {
			.source = cfg->port,
			.dest = peer_port,
			.len = bpf_htons(inner_len + sizeof(struct udphdr)),
		},
	};
	outer.ip.check = ip_checksum(&outer.ip);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0))
		return TC_ACT_SHOT;
	count(TX_PACKETS, packets);
	if (packets > 1)
		count(TX_SUPERPACKETS, 1);
	count(TX_BYTES, inner_len);
	/* The kernel finds the next hop to the peer and its MAC, as for any packet it routes. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

SEC("tc")
int udp_ingress(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct udp_tc_config *cfg = bpf_map_lookup_elem(&config, &key);

	if (!cfg || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_pull_data(skb, ETH_HLEN + ENCAP_LEN + sizeof(struct iphdr)))
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
	if (outer->frag_off & bpf_htons(IP_FRAGMENT) || inner->version != 4 || inner->ihl < 5 ||
	    bpf_ntohs(inner->tot_len) != skb->len - ETH_HLEN - ENCAP_LEN || inner->ttl <= 1) {
		count(RX_PASSED, 1);
		return TC_ACT_OK;
	}
	__u32 inner_len = skb->len - ETH_HLEN - ENCAP_LEN;
	__u32 packets = segments(skb);

	decrement_ttl(inner);
	if (bpf_skb_adjust_room(skb, -(__s32)ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return TC_ACT_SHOT;
	count(RX_PACKETS, packets);
	if (packets > 1)
		count(RX_SUPERPACKETS, 1);
	count(RX_BYTES, inner_len);
	return bpf_redirect(cfg->tun_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
