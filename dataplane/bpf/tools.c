// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* Programs for tests and benchmarks, not for the relay:
 *
 *   turnpike_reflect  every IPv4 UDP datagram to port 7 goes back to its sender
 *                     (Ethernet, IP and UDP addresses swapped, XDP_TX): the physical
 *                     floor of a packet through an XDP program on this interface;
 *   turnpike_pass     passes everything: attached to the far end of a veth, it puts
 *                     that end in NAPI mode, so that frames sent into the veth with
 *                     XDP_TX arrive (see ARCHITECTURE.md, "The XDP fast path"). */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define REFLECT_PORT 7

SEC("xdp")
int turnpike_reflect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || udp->dest != bpf_htons(REFLECT_PORT))
		return XDP_PASS;
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	__u32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	__u16 p = udp->source;
	udp->source = udp->dest;
	udp->dest = p;
	/* Both checksums are sums: swapping two of their terms changes neither. */
	return XDP_TX;
}

SEC("xdp")
int turnpike_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
