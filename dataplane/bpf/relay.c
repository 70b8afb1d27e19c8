// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/* turnpike's XDP relay: forwards the established flows of UDP allocations before the
 * socket layer, and passes everything else to the workers (XDP_PASS), which handle it
 * exactly as they would without this program.
 *
 *   client -> peer  ChannelData on a channel in tp_chans: the 4-byte header stripped;
 *   client -> peer  a Send indication (XOR-PEER-ADDRESS, DATA, optional attributes and
 *                   FINGERPRINT; no integrity) from a client in tp_allocs to a peer IP in tp_perms:
 *                   the DATA sent alone;
 *   peer -> client  a datagram to a relayed address from a peer IP in tp_perms: as
 *                   ChannelData if the peer has a confirmed channel in tp_peers, else
 *                   as a Data indication.
 *
 * The IP header is written anew (TTL 64, DF if the allocation asked for it), the UDP
 * checksum is updated incrementally (an input without a checksum gives an output
 * without one; a partial one, from a sender on this host, is completed first: see
 * received_csum), and the next hop comes from bpf_fib_lookup: XDP_TX when it is the
 * interface the frame came in on, bpf_redirect to another. The maps are written only by
 * the workers: an entry exists only for a permitted, live flow of an allocation without
 * a bandwidth limit, with its deadline, checked here against the kernel's clock. IPv4
 * and IPv6 (RFC 6156: client, listening and relayed addresses of one family; a
 * mixed-family flow is passed), without IPv6 extension headers. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "relay.h"

#define AF_INET 2
#define AF_INET6 10
#define STUN_COOKIE 0x2112A442
#define STUN_HEADER 20
#define CHANNEL_HEADER 4
/* STUN header, XOR-PEER-ADDRESS (IPv4) and the DATA attribute's header. */
#define DATA_IND_HEADER (STUN_HEADER + 12 + 4)
/* How far the program walks a Send indication: attributes, and the bytes before and
 * after DATA it strips. */
#define SEND_MAX_ATTRS 8
#define SEND_MAX_HEAD 128
#define SEND_MAX_TAIL 64
#define HEADERS (sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr))
#define HEADERS6 (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct udphdr))
/* STUN header, XOR-PEER-ADDRESS (IPv6) and the DATA attribute's header. */
#define DATA_IND_HEADER6 (STUN_HEADER + 24 + 4)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ALLOCS);
	__type(key, struct tp_client);
	__type(value, struct tp_alloc);
} tp_allocs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_chan_key);
	__type(value, struct tp_chan);
} tp_chans SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_perm_key);
	__type(value, struct tp_perm);
} tp_perms SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_peer_key);
	__type(value, struct tp_peer);
} tp_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct tp_usage);
} tp_usage SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TP_DENY_WORDS);
	__type(key, __u32);
	__type(value, __u32);
} tp_deny_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TP_MAX_HOPS);
	__type(key, struct tp_hop_key);
	__type(value, struct tp_hop);
} tp_hops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TP_MAX_HOPS);
	__type(key, struct tp_hop_key6);
	__type(value, struct tp_hop6);
} tp_hops6 SEC(".maps");

/* The IPv6 paths are close to the 512 bytes of stack a program has: their hop key
 * and new entry are built in a per-CPU scratch value. */
struct tp_hop_scratch6 {
	struct tp_hop_key6 key;
	__u32 _pad;
	struct tp_hop6 hop;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tp_hop_scratch6);
} tp_hop_scratch6 SEC(".maps");

static __always_inline int denied_port(__u16 port_be)
{
	__u32 port = bpf_ntohs(port_be);
	__u32 k = port >> 5;
	__u32 *v = bpf_map_lookup_elem(&tp_deny_ports, &k);
	return v && ((*v >> (port & 31)) & 1);
}

static __always_inline void stat_add(__u32 i, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&tp_stats, &i);
	if (v)
		*v += n;
}

static __always_inline int pass(__u32 why)
{
	stat_add(why, 1);
	return XDP_PASS;
}

/* Ones' complement arithmetic on 16-bit words as they lie in memory: the sum is the
 * same whatever the byte order, as long as every word is taken the same way. */
static __always_inline __u64 add16(__u64 s, __u16 w) { return s + w; }
static __always_inline __u64 sub16(__u64 s, __u16 w) { return s + (__u16)~w; }
static __always_inline __u64 add32(__u64 s, __u32 w) { return s + (w >> 16) + (w & 0xffff); }
static __always_inline __u64 sub32(__u64 s, __u32 w)
{
	return sub16(sub16(s, w >> 16), w & 0xffff);
}

static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* A byte at an even (or odd) offset of a 16-bit word, as that word lies in memory. */
static __always_inline __u16 byte_word(__u8 b, int odd)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return odd ? (__u16)b << 8 : b;
#else
	return odd ? b : (__u16)b << 8;
#endif
}

/* The buffer a datagram is summed through (see TP_CSUM_CHUNK). */
struct tp_csum_buf {
	__u8 b[TP_CSUM_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tp_csum_buf);
} tp_csum_buf SEC(".maps");

/* The interfaces the program is attached to in generic (skb) mode, written by the
 * loader. There a frame is the sender's skb, which keeps CHECKSUM_PARTIAL and its
 * csum_start through the program: a device that completes it on the way out (any
 * without checksum offload, or a NIC) would do so at offsets the program's header
 * changes moved. Partial checksums arriving there are left to the workers. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} tp_generic_ifs SEC(".maps");

/* The ones' complement sum of the `len` bytes at offset `off` of the frame (an odd
 * length padded with a zero byte, as RFC 768 pads), or 0 when they cannot be read or
 * are more than TP_CSUM_MAX. A BPF function of its own, so that its loop is verified
 * once and its stack is not added to the paths'. */
static __attribute__((noinline)) __u64 frame_sum(struct xdp_md *ctx, __u32 off, __u32 len)
{
	__u32 zero = 0;
	struct tp_csum_buf *b = bpf_map_lookup_elem(&tp_csum_buf, &zero);
	if (!b || len == 0 || len > TP_CSUM_MAX)
		return 0;
	__u64 s = 0;
	__u32 done = 0;
	/* Whole chunks; the loop's one exit keeps the verifier's paths linear. */
	for (__u32 i = 0; i < TP_CSUM_MAX / TP_CSUM_CHUNK; i++) {
		if (done + TP_CSUM_CHUNK > len)
			break;
		if (bpf_xdp_load_bytes(ctx, off + done, b->b, TP_CSUM_CHUNK))
			return 0;
		/* Kernels differ in whether the helper folds its result to 16 bits; either
		 * way it is a ones' complement sum of the words as they lie in memory. */
		s += (__u32)bpf_csum_diff(0, 0, (__be32 *)b->b, TP_CSUM_CHUNK, 0);
		done += TP_CSUM_CHUNK;
	}
	/* The rest, less than a chunk: zeros after it add nothing to the sum. */
	__u64 take = len - done;
	/* Bounds the verifier can follow, kept from clang's rewriting by the empty asm. */
	asm volatile("" : "+r"(take));
	if (take >= TP_CSUM_CHUNK)
		return 0;
	if (take) {
		__builtin_memset(b->b, 0, TP_CSUM_CHUNK);
		if (bpf_xdp_load_bytes(ctx, off + done, b->b, take))
			return 0;
		s += (__u32)bpf_csum_diff(0, 0, (__be32 *)b->b, TP_CSUM_CHUNK, 0);
	}
	return s;
}

/* ---- Common to both families --------------------------------------------------
 * The steps the IPv4 and IPv6 paths share are these helpers, so that the two cannot
 * drift: lengths, padding, checksum updates, deadlines, the next-hop lookup's answer,
 * the ChannelData and Data indication headers, the UDP header and the accounting. */

/* A 16-bit field in network order, as a number. */
static __always_inline __u16 be16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* An entry is used only while now < its deadline (relay.h). */
static __always_inline int live(__u64 now, __u64 deadline_ns)
{
	return now < deadline_ns;
}

/* The lengths of the UDP datagram at `udp` (its header readable), in an IP packet
 * with `ip_payload` bytes after its IP header: the UDP payload's (`n`) and the
 * Ethernet padding after the packet (`extra`, cut off when the frame is sent). A short
 * frame may carry such padding: the IP length rules. 0, or why the frame is passed. */
static __always_inline int udp_lengths(struct udphdr *udp, void *end, __u32 ip_payload,
				       __u32 *n, __u32 *extra)
{
	__u32 ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(*udp) || ip_payload != ulen || (void *)udp + ulen > end)
		return TP_PASS_MALFORMED;
	*extra = end - ((void *)udp + ulen);
	if (*extra > 64)
		return TP_PASS_MALFORMED;
	*n = ulen - sizeof(*udp);
	return 0;
}

/* What a client's UDP payload at `p` (`n` bytes) is for the program. */
enum kind {
	KIND_OTHER,   /* a peer's datagram to a relayed address, or the workers' */
	KIND_CHANNEL, /* perhaps ChannelData (first byte 0x40..0x7f) */
	KIND_SEND,    /* a Send indication */
};

static __always_inline int payload_kind(const __u8 *p, __u32 n, void *end)
{
	if ((void *)(p + 1) > end)
		return KIND_OTHER;
	__u8 first = p[0];
	if (first >= 0x40 && first <= 0x7f)
		return KIND_CHANNEL;
	if (first <= 0x01 && n >= STUN_HEADER && (void *)(p + 8) <= end &&
	    *(__u32 *)(p + 4) == bpf_htonl(STUN_COOKIE) && be16(p) == 0x0016)
		return KIND_SEND;
	/* A request or another indication to a relayed address is a peer's datagram
	 * like any other; to a listening address, the workers'. */
	return KIND_OTHER;
}

/* The pseudo-header's length and the UDP header (its checksum aside), out of the sum
 * (`sub`) or into it: the part of a checksum update both families share. Over IPv6
 * the pseudo-header's length is 32 bits, its upper half 0 here. */
static __always_inline __u64 csum_udp(__u64 s, __u16 sport, __u16 dport, __u16 ulen,
				      int sub)
{
	if (sub) {
		s = sub16(s, ulen); /* pseudo-header */
		s = sub16(s, sport);
		s = sub16(s, dport);
		return sub16(s, ulen); /* UDP header */
	}
	s = add16(s, ulen);
	s = add16(s, sport);
	s = add16(s, dport);
	return add16(s, ulen);
}

/* The checksum a relayed datagram goes out with, from the received one `old` and the
 * updated sum: none when it came without one (IPv4 only: over IPv6 it is mandatory,
 * and a datagram without one is passed). */
static __always_inline __u16 finish_csum(__u16 old, __u64 s)
{
	if (old == 0)
		return 0;
	__u16 c = ~fold(s);
	return c ? c : 0xffff;
}

/* A ChannelData message of `n` bytes at `p` (its 4-byte header readable): its data's
 * length, and the 0 to 3 bytes of padding after the data. 0, or why the frame is
 * passed. */
static __always_inline int channel_len(const __u8 *p, __u32 n, __u32 *len, __u32 *pad)
{
	*len = be16(p + 2);
	if (*len + CHANNEL_HEADER > n)
		return TP_PASS_MALFORMED;
	*pad = n - CHANNEL_HEADER - *len;
	if (*pad > 3)
		return TP_PASS_MALFORMED;
	return 0;
}

/* The ChannelData header at `p`, out of the sum. */
static __always_inline __u64 sub_channel_header(__u64 s, const __u8 *p)
{
	s = sub16(s, *(__u16 *)p);
	return sub16(s, *(__u16 *)(p + 2));
}

/* Padding over UDP is optional; non-zero padding would change the sum: left to the
 * workers. `pad` (0 to 3) bytes at frame offset `at`. 0, or why the frame is passed. */
static __always_inline int zero_padding(struct xdp_md *ctx, __u32 at, __u32 pad)
{
	if (!pad)
		return 0;
	__u8 z[4] = {};
	int bad = pad == 1   ? bpf_xdp_load_bytes(ctx, at, z, 1)
		  : pad == 2 ? bpf_xdp_load_bytes(ctx, at, z, 2)
			     : bpf_xdp_load_bytes(ctx, at, z, 3);
	if (bad)
		return TP_PASS_MALFORMED;
	if (*(__u32 *)z)
		return TP_PASS_UNSUPPORTED;
	return 0;
}

/* Writes `pad` (0 to 3) zeros at frame offset `at`; non-zero when it could not. */
static __always_inline int put_padding(struct xdp_md *ctx, __u32 at, __u32 pad)
{
	if (!pad)
		return 0;
	__u8 zero[4] = {};
	return pad == 1   ? bpf_xdp_store_bytes(ctx, at, zero, 1)
	       : pad == 2 ? bpf_xdp_store_bytes(ctx, at, zero, 2)
			  : bpf_xdp_store_bytes(ctx, at, zero, 3);
}

/* A Send indication's STUN header, read into `hdr` from frame offset `base` (the UDP
 * payload, `n` bytes): its length must be the rest of the payload, a multiple of 4.
 * 0, or why the frame is passed. */
static __always_inline int send_header(struct xdp_md *ctx, __u32 base, __u32 n, __u8 *hdr)
{
	if (bpf_xdp_load_bytes(ctx, base, hdr, STUN_HEADER))
		return TP_PASS_MALFORMED;
	__u32 mlen = be16(hdr + 2);
	if (mlen + STUN_HEADER != n || (mlen & 3))
		return TP_PASS_MALFORMED;
	return 0;
}

/* What the program takes from a Send indication. */
struct send_ind {
	__u32 data_off, data_len; /* DATA's value, from the STUN header's start */
	__u8 peer_ip[16];         /* XOR-PEER-ADDRESS, decoded: 4 bytes for IPv4 */
	__u16 peer_port;          /* network order */
};

/* Walks a Send indication's attributes (`hdr` its STUN header, `base` and `n` as for
 * send_header): exactly one XOR-PEER-ADDRESS of the family of the path (`v6`) and one
 * DATA; other comprehension-optional attributes are ignored as the workers ignore
 * them; MESSAGE-INTEGRITY and other comprehension-required attributes are left to the
 * workers. 0, or why the frame is passed. */
static __always_inline int send_attrs(struct xdp_md *ctx, __u32 base, __u32 n,
				      const __u8 *hdr, int v6, struct send_ind *si)
{
	/* XOR-PEER-ADDRESS: family 1 and 4 address bytes, or family 2 and 16. */
	const __u32 alen_peer = v6 ? 20 : 8;
	__u32 off = STUN_HEADER;
	int have_peer = 0, have_data = 0;
	si->data_off = 0;
	si->data_len = 0;
	si->peer_port = 0;
	for (int i = 0; i < SEND_MAX_ATTRS; i++) {
		if (off >= n)
			break;
		__u8 ah[4];
		if (off > 0xffff || bpf_xdp_load_bytes(ctx, base + off, ah, 4))
			return TP_PASS_MALFORMED;
		__u16 type = be16(ah);
		__u32 alen = be16(ah + 2);
		__u32 value = off + 4;
		if (value + alen > n)
			return TP_PASS_MALFORMED;
		if (type == 0x0012) {
			__u8 xa[20];
			if (have_peer || alen != alen_peer)
				return TP_PASS_UNSUPPORTED;
			if (v6 ? bpf_xdp_load_bytes(ctx, base + value, xa, 20)
			       : bpf_xdp_load_bytes(ctx, base + value, xa, 8))
				return TP_PASS_UNSUPPORTED;
			if (xa[1] != (v6 ? 0x02 : 0x01))
				return TP_PASS_UNSUPPORTED; /* a peer of the other family */
			si->peer_port = *(__u16 *)(xa + 2) ^ bpf_htons(STUN_COOKIE >> 16);
			/* XORed with the magic cookie (and, for IPv6, the transaction id that
			 * follows it in the header). */
#pragma unroll
			for (int j = 0; j < 16; j++)
				if (j < (int)alen_peer - 4)
					si->peer_ip[j] = xa[4 + j] ^ hdr[4 + j];
			have_peer = 1;
		} else if (type == 0x0013) {
			if (have_data)
				return TP_PASS_UNSUPPORTED;
			si->data_off = value;
			si->data_len = alen;
			have_data = 1;
		} else if (type == 0x8028) {
			/* FINGERPRINT, last: not verified, as the workers do not verify it
			 * on a Send indication from a client with an allocation either. */
			if (alen != 4 || value + 4 != n)
				return TP_PASS_UNSUPPORTED;
		} else if (type != 0x001A && type < 0x8000) {
			/* DONT-FRAGMENT is the allocation's, as for the workers. */
			return TP_PASS_UNSUPPORTED;
		}
		off = value + ((alen + 3) & ~3u);
	}
	if (off < n || !have_peer || !have_data || si->peer_port == 0)
		return TP_PASS_UNSUPPORTED;
	if (denied_port(si->peer_port))
		return TP_PASS_DENIED_PORT;
	return 0;
}

/* Takes out of the sum `*s` what a Send indication loses when only its DATA is sent:
 * everything before DATA's value (a multiple of 4 bytes), `*head` bytes, and
 * everything after it (padding, later attributes), `*tail` bytes. 0, or why the frame
 * is passed. */
static __always_inline int send_unsum(struct xdp_md *ctx, __u32 base, __u32 n,
				      const struct send_ind *si, __u64 *s, __u32 *head,
				      __u32 *tail)
{
	*head = si->data_off;
	*tail = n - si->data_off - si->data_len;
	if (*head > SEND_MAX_HEAD || *tail > SEND_MAX_TAIL)
		return TP_PASS_UNSUPPORTED;
	if (*head < STUN_HEADER)
		return TP_PASS_MALFORMED;
	__u64 sum = *s;
	for (int i = 0; i < SEND_MAX_HEAD / 4; i++) {
		__u16 w[2];
		if ((__u32)i * 4 >= *head)
			break;
		if (bpf_xdp_load_bytes(ctx, base + i * 4, w, 4))
			return TP_PASS_MALFORMED;
		sum = sub16(sub16(sum, w[0]), w[1]);
	}
	int odd = si->data_len & 1;
	for (int i = 0; i < SEND_MAX_TAIL; i++) {
		__u8 b;
		if ((__u32)i >= *tail)
			break;
		if (bpf_xdp_load_bytes(ctx, base + si->data_off + si->data_len + i, &b, 1))
			return TP_PASS_MALFORMED;
		sum = sub16(sum, byte_word(b, (odd + i) & 1));
	}
	*s = sum;
	return 0;
}

/* Writes a ChannelData header for channel `ch` and `n` bytes of data at `h` (the
 * frame's UDP payload) and adds it to `*s`. -1 when the frame is shorter (not as
 * resized). */
static __always_inline int put_channel_header(__u8 *h, void *end, __u16 ch, __u32 n,
					      __u64 *s)
{
	if ((void *)(h + CHANNEL_HEADER) > end)
		return -1;
	h[0] = ch >> 8;
	h[1] = ch & 0xff;
	h[2] = n >> 8;
	h[3] = n & 0xff;
	*s = add16(add16(*s, *(__u16 *)h), *(__u16 *)(h + 2));
	return 0;
}

/* Writes a Data indication's header at `h` (the frame's UDP payload, at frame offset
 * `at`): a STUN header with a random transaction id, XOR-PEER-ADDRESS of the peer
 * `peer_ip` (4 or 16 bytes, `v6`), `peer_port` and DATA's header, for `n` bytes of
 * data and `pad` zeros after them (written too); adds the header to `*s` (the zeros
 * add nothing). -1 when the frame is shorter (not as resized). */
static __always_inline int put_data_ind(struct xdp_md *ctx, __u8 *h, void *end, __u32 at,
					const __u8 *peer_ip, __u16 peer_port, int v6, __u32 n,
					__u32 pad, __u64 *s)
{
	const __u32 alen = v6 ? 16 : 4;
	/* DATA_IND_HEADER or DATA_IND_HEADER6 */
	const __u32 hlen = STUN_HEADER + 8 + alen + 4;
	if ((void *)(h + hlen) > end)
		return -1;
	__u16 *w = (__u16 *)h;
	w[0] = bpf_htons(0x0017);
	w[1] = bpf_htons(hlen - STUN_HEADER + n + pad);
	*(__u32 *)(h + 4) = bpf_htonl(STUN_COOKIE);
	*(__u32 *)(h + 8) = bpf_get_prandom_u32();
	*(__u32 *)(h + 12) = bpf_get_prandom_u32();
	*(__u32 *)(h + 16) = bpf_get_prandom_u32();
	w[10] = bpf_htons(0x0012);
	w[11] = bpf_htons(4 + alen);
	w[12] = bpf_htons(v6 ? 0x0002 : 0x0001);
	w[13] = peer_port ^ bpf_htons(STUN_COOKIE >> 16);
	/* XORed with the magic cookie and (IPv6) the transaction id, just written. */
#pragma unroll
	for (int j = 0; j < 16; j++)
		if (j < (int)alen)
			h[28 + j] = peer_ip[j] ^ h[4 + j];
	__u16 *d = (__u16 *)(h + 28 + alen);
	d[0] = bpf_htons(0x0013);
	d[1] = bpf_htons(n);
	__u64 sum = *s;
#pragma unroll
	for (int i = 0; i < DATA_IND_HEADER6 / 2; i++)
		if (i < (int)hlen / 2)
			sum = add16(sum, w[i]);
	*s = sum;
	if (put_padding(ctx, at + hlen + n, pad))
		return -1;
	return 0;
}

/* Moves the frame's start by `head` bytes and its end by `tail`, with the signs of
 * bpf_xdp_adjust_head and bpf_xdp_adjust_tail (a positive head shrinks the frame, a
 * positive tail grows it). 0, or why the frame is passed. */
static __always_inline int resize(struct xdp_md *ctx, int head, int tail)
{
	if (bpf_xdp_adjust_head(ctx, head))
		return TP_PASS_HEADROOM;
	if (tail && bpf_xdp_adjust_tail(ctx, tail))
		return TP_PASS_HEADROOM;
	return 0;
}

/* What a relayed datagram is, whatever its family: its new UDP checksum and what it
 * counts for. */
struct relayed {
	__u16 csum; /* the new UDP checksum, 0 for none */
	__u8 dont_fragment; /* IPv4 */
	__u32 slot;
	__u32 payload; /* application bytes */
	__u32 stat;
	int down;
	__u32 up_slot; /* a hairpin: the sender's usage slot + 1 (counted to_peer); else 0 */
};

/* BPF_FIB_LOOKUP_SRC (Linux 6.7), spelled out for older uapi headers. */
#define TP_FIB_LOOKUP_SRC (1U << 4)

/* A next-hop lookup for a datagram of `ip_len` bytes, to go out where the frame came
 * in: the addresses are the family's. */
static __always_inline void fib_start(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				      __u8 family, __u16 ip_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = family;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = ip_len;
	fib->ifindex = ctx->ingress_ifindex;
}

/* Why the frame is passed when the next-hop lookup answered `rc`; 0 on success. */
static __always_inline int fib_reason(int rc)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return TP_PASS_TOO_BIG;
	/* The kernel looks routes up for XDP as a router does: only on an interface with
	 * forwarding on (net.ipv4.conf.IFACE.forwarding, net.ipv6.conf.IFACE.forwarding). */
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return TP_PASS_FORWARDING_OFF;
	return TP_PASS_NO_ROUTE;
}

/* The Ethernet header of a frame to the next hop `fib` found. */
static __always_inline void put_eth(struct ethhdr *eth, const struct bpf_fib_lookup *fib,
				    __u16 proto)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(proto);
}

/* The steps after the IP header: writes the UDP header, counts the datagram in its
 * allocation's usage and in tp_stats, and sends the frame to the next hop. */
static __always_inline int send_frame(struct xdp_md *ctx, struct udphdr *udp, __u16 sport,
				      __u16 dport, __u16 ulen, const struct relayed *r,
				      const struct bpf_fib_lookup *fib)
{
	udp->source = sport;
	udp->dest = dport;
	udp->len = ulen;
	udp->check = r->csum;

	__u32 slot = r->slot;
	struct tp_usage *u = bpf_map_lookup_elem(&tp_usage, &slot);
	if (u) {
		if (r->down) {
			u->to_client_packets += 1;
			u->to_client_bytes += r->payload;
		} else {
			u->to_peer_packets += 1;
			u->to_peer_bytes += r->payload;
		}
	}
	if (r->up_slot) {
		/* A hairpin: relayed out of the sender's allocation as well. */
		slot = r->up_slot - 1;
		u = bpf_map_lookup_elem(&tp_usage, &slot);
		if (u) {
			u->to_peer_packets += 1;
			u->to_peer_bytes += r->payload;
		}
		stat_add(TP_BYTES_UP, r->payload);
	}
	stat_add(r->stat, 1);
	stat_add(r->down ? TP_BYTES_DOWN : TP_BYTES_UP, r->payload);
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

/* ---- IPv4 ---------------------------------------------------------------------- */

/* What changes in the UDP checksum when a datagram's addresses, ports and length
 * change: the pseudo-header and the UDP header, old out, new in. */
struct flow {
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u16 ulen; /* network order */
};

static __always_inline __u64 csum_swap(__u64 s, const struct flow *o, const struct flow *n)
{
	s = sub32(s, o->saddr);
	s = sub32(s, o->daddr);
	s = csum_udp(s, o->sport, o->dport, o->ulen, 1);
	s = add32(s, n->saddr);
	s = add32(s, n->daddr);
	return csum_udp(s, n->sport, n->dport, n->ulen, 0);
}

struct out {
	struct flow flow;
	struct relayed r;
};

/* A hit in tp_hops/tp_hops6: the next hop into `fib` as bpf_fib_lookup would give it. */
static __always_inline int hop_hit(const struct tp_hop *h, __u64 now, __u16 len,
				   struct bpf_fib_lookup *fib)
{
	if (!h || now >= h->expires_ns || len > h->max_len)
		return 0;
	fib->ifindex = h->ifindex;
	__builtin_memcpy(fib->dmac, h->dmac, ETH_ALEN);
	__builtin_memcpy(fib->smac, h->smac, ETH_ALEN);
	return 1;
}

static __always_inline void hop_fill(struct tp_hop *v, __u64 now, __u16 len,
				     const struct bpf_fib_lookup *fib)
{
	v->expires_ns = now + TP_HOP_TTL_NS;
	v->ifindex = fib->ifindex;
	v->max_len = len;
	__builtin_memcpy(v->dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(v->smac, fib->smac, ETH_ALEN);
}

/* bpf_fib_lookup through tp_hops: `fib` is filled in as for the helper; on success its
 * dmac, smac and ifindex are the next hop's. */
static __always_inline int fib_lookup4(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				       __u64 now)
{
	struct tp_hop_key k = {
		.ifindex = fib->ifindex,
		.src = fib->ipv4_src,
		.dst = fib->ipv4_dst,
	};
	__u16 len = fib->tot_len;
	struct tp_hop *h = bpf_map_lookup_elem(&tp_hops, &k);
	if (hop_hit(h, now, len, fib)) {
		if (!k.src)
			fib->ipv4_src = h->src;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	/* Without a source (a reply through a wildcard listener), the lookup chooses it
	 * as the kernel does for the workers' wildcard sockets: the route's preferred
	 * source (Linux 6.7+; older kernels refuse the flag and the packet is passed). */
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), k.src ? 0 : TP_FIB_LOOKUP_SRC);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		struct tp_hop v = {};
		hop_fill(&v, now, len, fib);
		v.src = fib->ipv4_src;
		bpf_map_update_elem(&tp_hops, &k, &v, BPF_ANY);
	}
	return rc;
}

/* The same for IPv6, through tp_hops6. */
static __always_inline int fib_lookup6(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				       __u64 now)
{
	__u32 zero = 0;
	struct tp_hop_scratch6 *sc = bpf_map_lookup_elem(&tp_hop_scratch6, &zero);
	if (!sc)
		return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	sc->key.ifindex = fib->ifindex;
	__builtin_memcpy(sc->key.src, fib->ipv6_src, 16);
	__builtin_memcpy(sc->key.dst, fib->ipv6_dst, 16);
	__u32 *w = (__u32 *)sc->key.src;
	int nosrc = !(w[0] | w[1] | w[2] | w[3]);
	__u16 len = fib->tot_len;
	struct tp_hop6 *h = bpf_map_lookup_elem(&tp_hops6, &sc->key);
	if (h && hop_hit(&h->hop, now, len, fib)) {
		if (nosrc)
			__builtin_memcpy(fib->ipv6_src, h->src, 16);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	/* No source: a reply through a wildcard listener (see fib_lookup4). */
	int rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), nosrc ? TP_FIB_LOOKUP_SRC : 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		hop_fill(&sc->hop.hop, now, len, fib);
		__builtin_memcpy(sc->hop.src, fib->ipv6_src, 16);
		bpf_map_update_elem(&tp_hops6, &sc->key, &sc->hop, BPF_ANY);
	}
	return rc;
}

/* Looks up the next hop of the datagram to be sent, before the frame is changed. */
static __always_inline int route(struct xdp_md *ctx, const struct out *o,
				 struct bpf_fib_lookup *fib, __u64 now)
{
	fib_start(ctx, fib, AF_INET, sizeof(struct iphdr) + bpf_ntohs(o->flow.ulen));
	fib->ipv4_src = o->flow.saddr;
	fib->ipv4_dst = o->flow.daddr;
	return fib_reason(fib_lookup4(ctx, fib, now));
}

/* Writes Ethernet, IPv4 and UDP headers at the frame's start (the frame already has its
 * final size) and sends it to the next hop. */
static __always_inline int emit(struct xdp_md *ctx, const struct out *o,
				const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	if ((void *)(udp + 1) > end)
		return pass(TP_PASS_HEADROOM);

	put_eth(eth, fib, ETH_P_IP);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(bpf_ntohs(o->flow.ulen) + sizeof(*ip));
	if (o->r.dont_fragment) {
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000);
	} else {
		ip->id = (__u16)bpf_get_prandom_u32();
		ip->frag_off = 0;
	}
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->check = 0;
	ip->saddr = o->flow.saddr;
	ip->daddr = o->flow.daddr;
	__u16 *w = (__u16 *)ip;
	__u64 s = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	ip->check = ~fold(s);

	return send_frame(ctx, udp, o->flow.sport, o->flow.dport, o->flow.ulen, &o->r, fib);
}

/* A datagram at a relayed address, as the program delivers it to that allocation's
 * client: from a peer, or from another allocation's relayed address on this server
 * (the hairpin: channel_up, send_up), as it would have arrived had it been sent. Kept in
 * a per-CPU value (tp_arrival): the paths that fill it have used most of the stack. */
struct arrival {
	struct flow flow; /* as it arrives at the relayed address */
	__u16 csum; /* its UDP checksum (0 for none) */
	__u64 now;
	__u32 n;    /* its payload */
	__u32 head; /* frame bytes between the UDP header and the payload, to remove */
	__u32 tail; /* frame bytes after the payload, to remove (Ethernet padding too) */
	__u32 up_slot; /* a hairpin: the sender's usage slot + 1; 0 from a peer */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct arrival);
} tp_arrival SEC(".maps");

/* What channel_up and send_up return when the datagram is a hairpin, its arrival
 * written (-1 is "not ChannelData"). */
#define TP_HAIRPIN -2

/* The hairpin: `o` is a datagram the program is about to send from a relayed address
 * (`o->r.slot` its allocation's slot), with `head` and `tail` the frame's bytes around
 * its payload. When its destination is another relayed address of this server with a
 * permission for the sender's relayed IP, it is to be delivered to that allocation's
 * client rather than sent out and brought back: 1, and `*a` describes its arrival
 * there. 0 otherwise: it is sent as it is (an address of this host is then left to
 * the workers, which apply every rule). */
static __always_inline int hairpin4(const struct out *o, __u64 now, __u32 head, __u32 tail,
				    struct arrival *a)
{
	struct tp_perm_key hk = {
		.relay_ip = o->flow.daddr,
		.peer_ip = o->flow.saddr,
		.relay_port = o->flow.dport,
	};
	if (!bpf_map_lookup_elem(&tp_perms, &hk))
		return 0;
	a->flow = o->flow;
	a->now = now;
	a->csum = o->r.csum;
	a->n = o->r.payload;
	a->head = head;
	a->tail = tail;
	a->up_slot = o->r.slot + 1;
	return 1;
}

/* Delivers `in` to the client of the relayed address it arrives at, if that
 * allocation permits the sender's IP: as ChannelData if the sender has a confirmed
 * channel in tp_peers, else as a Data indication. The peer's path and the hairpins
 * share it. */
static __always_inline int deliver4(struct xdp_md *ctx, const struct arrival *in)
{
	struct tp_perm_key pk = {
		.relay_ip = in->flow.daddr,
		.peer_ip = in->flow.saddr,
		.relay_port = in->flow.dport,
	};
	struct tp_perm *pm = bpf_map_lookup_elem(&tp_perms, &pk);
	if (!pm)
		return pass(TP_PASS_NO_ENTRY);
	__u64 now = in->now;
	if (!live(now, pm->deadline_ns))
		return pass(TP_PASS_EXPIRED);
	if (!in->up_slot && denied_port(in->flow.sport))
		return pass(TP_PASS_DENIED_PORT);
	struct tp_peer_key qk = {
		.relay_ip = in->flow.daddr,
		.peer_ip = in->flow.saddr,
		.relay_port = in->flow.dport,
		.peer_port = in->flow.sport,
	};
	struct tp_peer *q = bpf_map_lookup_elem(&tp_peers, &qk);
	int channel = q && live(now, q->deadline_ns);

	__u32 n = in->n;
	__u32 grow = channel ? CHANNEL_HEADER : DATA_IND_HEADER;
	__u32 pad = channel ? 0 : (4 - (n & 3)) & 3;
	__u32 stat = channel ? TP_RELAYED_CHANNEL_DOWN : TP_RELAYED_DATA_DOWN;
	if (in->up_slot)
		stat = channel ? TP_RELAYED_HAIRPIN_CHANNEL : TP_RELAYED_HAIRPIN_DATA;
	struct out o = {
		.flow = {
			.saddr = pm->client.server_ip,
			.daddr = pm->client.client_ip,
			.sport = pm->client.server_port,
			.dport = pm->client.client_port,
			.ulen = bpf_htons(n + grow + pad + sizeof(struct udphdr)),
		},
		.r = {
			.slot = pm->slot,
			.payload = n,
			.stat = stat,
			.down = 1,
			.up_slot = in->up_slot,
		},
	};
	__u16 ch = channel ? q->channel : 0;

	/* A wildcard listener (server_ip 0): the route lookup supplies the source. */
	struct bpf_fib_lookup fib;
	int why = route(ctx, &o, &fib, now);
	if (why)
		return pass(why);
	if (o.flow.saddr == 0)
		o.flow.saddr = fib.ipv4_src;
	if (o.flow.saddr == 0)
		return pass(TP_PASS_NO_ROUTE);
	why = resize(ctx, (int)in->head - (int)grow, (int)pad - (int)in->tail);
	if (why)
		return pass(why);

	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *h = data + HEADERS;
	__u64 s = (__u16)~in->csum;
	s = csum_swap(s, &in->flow, &o.flow);
	if (channel ? put_channel_header(h, end, ch, n, &s)
		    : put_data_ind(ctx, h, end, HEADERS, (const __u8 *)&in->flow.saddr,
				   in->flow.sport, 0, n, pad, &s))
		return XDP_DROP;
	o.r.csum = finish_csum(in->csum, s);
	return emit(ctx, &o, &fib);
}

/* client -> peer: ChannelData. `p` is the UDP payload, `n` its length. */
static __always_inline int channel_up(struct xdp_md *ctx, const struct flow *in, __u16 old_csum,
				      __u8 *p, __u32 n, __u32 extra, void *end, struct arrival *hp)
{
	if ((void *)(p + CHANNEL_HEADER) > end)
		return -1;
	struct tp_chan_key k = {
		.client = {
			.client_ip = in->saddr,
			.server_ip = in->daddr,
			.client_port = in->sport,
			.server_port = in->dport,
		},
		.channel = be16(p),
	};
	struct tp_chan *c = bpf_map_lookup_elem(&tp_chans, &k);
	if (!c) {
		/* A wildcard listener's allocation has the unspecified server address. */
		k.client.server_ip = 0;
		c = bpf_map_lookup_elem(&tp_chans, &k);
	}
	if (!c)
		return -1; /* perhaps a peer's datagram to a relayed address */
	__u64 now = bpf_ktime_get_ns();
	if (!live(now, c->deadline_ns))
		return pass(TP_PASS_EXPIRED);
	if (denied_port(c->peer_port))
		return pass(TP_PASS_DENIED_PORT);
	__u32 len, pad;
	int why = channel_len(p, n, &len, &pad);
	if (why)
		return pass(why);

	struct out o = {
		.flow = {
			.saddr = c->relay_ip,
			.daddr = c->peer_ip,
			.sport = c->relay_port,
			.dport = c->peer_port,
			.ulen = bpf_htons(len + sizeof(struct udphdr)),
		},
		.r = {
			.dont_fragment = c->flags & TP_FLAG_DONT_FRAGMENT,
			.slot = c->slot,
			.payload = len,
			.stat = TP_RELAYED_CHANNEL_UP,
		},
	};
	__u64 s = (__u16)~old_csum;
	s = csum_swap(s, in, &o.flow);
	s = sub_channel_header(s, p);
	why = zero_padding(ctx, HEADERS + CHANNEL_HEADER + len, pad);
	if (why)
		return pass(why);
	o.r.csum = finish_csum(old_csum, s);
	if (hairpin4(&o, now, CHANNEL_HEADER, pad + extra, hp))
		return TP_HAIRPIN;

	struct bpf_fib_lookup fib;
	why = route(ctx, &o, &fib, now);
	if (!why)
		why = resize(ctx, CHANNEL_HEADER, -(int)(pad + extra));
	if (why)
		return pass(why);
	return emit(ctx, &o, &fib);
}

/* client -> peer: a Send indication. */
static __always_inline int send_up(struct xdp_md *ctx, const struct flow *in, __u16 old_csum,
				   __u32 n, __u32 extra, struct arrival *hp)
{
	const __u32 base = HEADERS; /* the UDP payload's offset in the frame */
	__u8 hdr[STUN_HEADER];
	int why = send_header(ctx, base, n, hdr);
	if (why)
		return pass(why);

	struct tp_client ck = {
		.client_ip = in->saddr,
		.server_ip = in->daddr,
		.client_port = in->sport,
		.server_port = in->dport,
	};
	struct tp_alloc *a = bpf_map_lookup_elem(&tp_allocs, &ck);
	if (!a) {
		ck.server_ip = 0;
		a = bpf_map_lookup_elem(&tp_allocs, &ck);
	}
	if (!a)
		return pass(TP_PASS_NO_ENTRY);
	__u64 now = bpf_ktime_get_ns();
	if (!live(now, a->deadline_ns))
		return pass(TP_PASS_EXPIRED);

	struct send_ind si;
	why = send_attrs(ctx, base, n, hdr, 0, &si);
	if (why)
		return pass(why);
	__u32 peer_ip;
	__builtin_memcpy(&peer_ip, si.peer_ip, 4);

	struct tp_perm_key pk = {
		.relay_ip = a->relay_ip,
		.peer_ip = peer_ip,
		.relay_port = a->relay_port,
	};
	struct tp_perm *pm = bpf_map_lookup_elem(&tp_perms, &pk);
	if (!pm)
		return pass(TP_PASS_NO_ENTRY);
	if (!live(now, pm->deadline_ns))
		return pass(TP_PASS_EXPIRED);

	struct out o = {
		.flow = {
			.saddr = a->relay_ip,
			.daddr = peer_ip,
			.sport = a->relay_port,
			.dport = si.peer_port,
			.ulen = bpf_htons(si.data_len + sizeof(struct udphdr)),
		},
		.r = {
			.dont_fragment = a->flags & TP_FLAG_DONT_FRAGMENT,
			.slot = a->slot,
			.payload = si.data_len,
			.stat = TP_RELAYED_SEND_UP,
		},
	};
	__u64 s = (__u16)~old_csum;
	s = csum_swap(s, in, &o.flow);
	__u32 head, tail;
	why = send_unsum(ctx, base, n, &si, &s, &head, &tail);
	if (why)
		return pass(why);
	o.r.csum = finish_csum(old_csum, s);
	if (hairpin4(&o, now, head, tail + extra, hp))
		return TP_HAIRPIN;

	struct bpf_fib_lookup fib;
	why = route(ctx, &o, &fib, now);
	if (!why)
		why = resize(ctx, (int)head, -(int)(tail + extra));
	if (why)
		return pass(why);
	return emit(ctx, &o, &fib);
}

/* ---- IPv6 ---------------------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ALLOCS);
	__type(key, struct tp_client6);
	__type(value, struct tp_alloc6);
} tp_allocs6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_chan_key6);
	__type(value, struct tp_chan6);
} tp_chans6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_perm_key6);
	__type(value, struct tp_perm6);
} tp_perms6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, TP_MAX_ENTRIES);
	__type(key, struct tp_peer_key6);
	__type(value, struct tp_peer);
} tp_peers6 SEC(".maps");

struct flow6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport, dport;
	__u16 ulen; /* network order */
	/* Of a received datagram: its UDP checksum, payload length and the Ethernet
	 * padding after it (BPF functions take at most five arguments). Of a hairpin's
	 * arrival (tp_arrival6): the bytes around its payload to remove (`head`, and
	 * `extra` for all those after it) and the sender's usage slot + 1 (`up_slot`);
	 * both 0 for a received datagram. */
	__u16 csum;
	__u32 n, extra;
	__u32 head, up_slot;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow6);
} tp_flow6 SEC(".maps");

/* A hairpin's arrival at the other relayed address (see struct arrival). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow6);
} tp_arrival6 SEC(".maps");

static __always_inline __u64 sum_addr(__u64 s, const __u8 *a, int sub)
{
	const __u16 *w = (const __u16 *)a;
#pragma unroll
	for (int i = 0; i < 8; i++)
		s = sub ? sub16(s, w[i]) : add16(s, w[i]);
	return s;
}

static __always_inline __u64 csum_swap6(__u64 s, const struct flow6 *o, const struct flow6 *n)
{
	s = sum_addr(s, o->saddr, 1);
	s = sum_addr(s, o->daddr, 1);
	s = csum_udp(s, o->sport, o->dport, o->ulen, 1);
	s = sum_addr(s, n->saddr, 0);
	s = sum_addr(s, n->daddr, 0);
	return csum_udp(s, n->sport, n->dport, n->ulen, 0);
}

struct out6 {
	struct flow6 flow;
	struct relayed r;
};

static __always_inline int route6(struct xdp_md *ctx, const struct out6 *o,
				  struct bpf_fib_lookup *fib, __u64 now)
{
	fib_start(ctx, fib, AF_INET6, sizeof(struct ipv6hdr) + bpf_ntohs(o->flow.ulen));
	__builtin_memcpy(fib->ipv6_src, o->flow.saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, o->flow.daddr, 16);
	return fib_reason(fib_lookup6(ctx, fib, now));
}

static __always_inline int emit6(struct xdp_md *ctx, const struct out6 *o,
				 const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	if ((void *)(udp + 1) > end)
		return pass(TP_PASS_HEADROOM);
	put_eth(eth, fib, ETH_P_IPV6);
	*(__u32 *)ip = bpf_htonl(0x60000000);
	ip->payload_len = o->flow.ulen;
	ip->nexthdr = IPPROTO_UDP;
	ip->hop_limit = 64;
	__builtin_memcpy(&ip->saddr, o->flow.saddr, 16);
	__builtin_memcpy(&ip->daddr, o->flow.daddr, 16);
	return send_frame(ctx, udp, o->flow.sport, o->flow.dport, o->flow.ulen, &o->r, fib);
}

/* The hairpin over IPv6 (see hairpin4): 1 and the arrival written in tp_arrival6 when
 * `o` goes to a relayed address of this server with a permission for the sender's. */
static __always_inline int hairpin6(const struct out6 *o, __u32 head, __u32 tail)
{
	struct tp_perm_key6 hk = {};
	__builtin_memcpy(hk.relay_ip, o->flow.daddr, 16);
	__builtin_memcpy(hk.peer_ip, o->flow.saddr, 16);
	hk.relay_port = o->flow.dport;
	if (!bpf_map_lookup_elem(&tp_perms6, &hk))
		return 0;
	__u32 zero = 0;
	struct flow6 *a = bpf_map_lookup_elem(&tp_arrival6, &zero);
	if (!a)
		return 0;
	__builtin_memcpy(a->saddr, o->flow.saddr, 16);
	__builtin_memcpy(a->daddr, o->flow.daddr, 16);
	a->sport = o->flow.sport;
	a->dport = o->flow.dport;
	a->ulen = o->flow.ulen;
	a->csum = o->r.csum;
	a->n = o->r.payload;
	a->head = head;
	a->extra = tail;
	a->up_slot = o->r.slot + 1;
	return 1;
}

static __attribute__((noinline)) int channel_up6(struct xdp_md *ctx, const struct flow6 *in)
{
	__u16 old_csum = in->csum;
	__u32 n = in->n, extra = in->extra;
	void *end = (void *)(long)ctx->data_end;
	__u8 *p = (void *)(long)ctx->data + HEADERS6;
	if ((void *)(p + CHANNEL_HEADER) > end)
		return -1;
	struct tp_chan_key6 k = {};
	__builtin_memcpy(k.client.client_ip, in->saddr, 16);
	__builtin_memcpy(k.client.server_ip, in->daddr, 16);
	k.client.client_port = in->sport;
	k.client.server_port = in->dport;
	k.channel = be16(p);
	struct tp_chan6 *c = bpf_map_lookup_elem(&tp_chans6, &k);
	if (!c) {
		/* A wildcard listener's allocation has the unspecified server address. */
		__builtin_memset(k.client.server_ip, 0, 16);
		c = bpf_map_lookup_elem(&tp_chans6, &k);
	}
	if (!c)
		return -1;
	__u64 now = bpf_ktime_get_ns();
	if (!live(now, c->deadline_ns))
		return pass(TP_PASS_EXPIRED);
	if (denied_port(c->peer_port))
		return pass(TP_PASS_DENIED_PORT);
	__u32 len, pad;
	int why = channel_len(p, n, &len, &pad);
	if (why)
		return pass(why);
	struct out6 o = {
		.flow = {
			.sport = c->relay_port,
			.dport = c->peer_port,
			.ulen = bpf_htons(len + sizeof(struct udphdr)),
		},
		.r = {
			.slot = c->slot,
			.payload = len,
			.stat = TP_RELAYED_CHANNEL_UP,
		},
	};
	__builtin_memcpy(o.flow.saddr, c->relay_ip, 16);
	__builtin_memcpy(o.flow.daddr, c->peer_ip, 16);
	__u64 s = (__u16)~old_csum;
	s = csum_swap6(s, in, &o.flow);
	s = sub_channel_header(s, p);
	why = zero_padding(ctx, HEADERS6 + CHANNEL_HEADER + len, pad);
	if (why)
		return pass(why);
	o.r.csum = finish_csum(old_csum, s);
	if (hairpin6(&o, CHANNEL_HEADER, pad + extra))
		return TP_HAIRPIN;
	struct bpf_fib_lookup fib;
	why = route6(ctx, &o, &fib, now);
	if (!why)
		why = resize(ctx, CHANNEL_HEADER, -(int)(pad + extra));
	if (why)
		return pass(why);
	return emit6(ctx, &o, &fib);
}

static __attribute__((noinline)) int send_up6(struct xdp_md *ctx, const struct flow6 *in)
{
	__u16 old_csum = in->csum;
	__u32 n = in->n, extra = in->extra;
	const __u32 base = HEADERS6;
	__u8 hdr[STUN_HEADER];
	int why = send_header(ctx, base, n, hdr);
	if (why)
		return pass(why);
	struct tp_client6 ck = {};
	__builtin_memcpy(ck.client_ip, in->saddr, 16);
	__builtin_memcpy(ck.server_ip, in->daddr, 16);
	ck.client_port = in->sport;
	ck.server_port = in->dport;
	struct tp_alloc6 *a = bpf_map_lookup_elem(&tp_allocs6, &ck);
	if (!a) {
		__builtin_memset(ck.server_ip, 0, 16);
		a = bpf_map_lookup_elem(&tp_allocs6, &ck);
	}
	if (!a)
		return pass(TP_PASS_NO_ENTRY);
	__u64 now = bpf_ktime_get_ns();
	if (!live(now, a->deadline_ns))
		return pass(TP_PASS_EXPIRED);

	struct send_ind si;
	why = send_attrs(ctx, base, n, hdr, 1, &si);
	if (why)
		return pass(why);
	struct tp_perm_key6 pk = {};
	__builtin_memcpy(pk.relay_ip, a->relay_ip, 16);
	__builtin_memcpy(pk.peer_ip, si.peer_ip, 16);
	pk.relay_port = a->relay_port;
	struct tp_perm6 *pm = bpf_map_lookup_elem(&tp_perms6, &pk);
	if (!pm)
		return pass(TP_PASS_NO_ENTRY);
	if (!live(now, pm->deadline_ns))
		return pass(TP_PASS_EXPIRED);
	struct out6 o = {
		.flow = {
			.sport = a->relay_port,
			.dport = si.peer_port,
			.ulen = bpf_htons(si.data_len + sizeof(struct udphdr)),
		},
		.r = {
			.slot = a->slot,
			.payload = si.data_len,
			.stat = TP_RELAYED_SEND_UP,
		},
	};
	__builtin_memcpy(o.flow.saddr, a->relay_ip, 16);
	__builtin_memcpy(o.flow.daddr, si.peer_ip, 16);
	__u64 s = (__u16)~old_csum;
	s = csum_swap6(s, in, &o.flow);
	__u32 head, tail;
	why = send_unsum(ctx, base, n, &si, &s, &head, &tail);
	if (why)
		return pass(why);
	o.r.csum = finish_csum(old_csum, s);
	if (hairpin6(&o, head, tail + extra))
		return TP_HAIRPIN;
	struct bpf_fib_lookup fib;
	why = route6(ctx, &o, &fib, now);
	if (!why)
		why = resize(ctx, (int)head, -(int)(tail + extra));
	if (why)
		return pass(why);
	return emit6(ctx, &o, &fib);
}

/* peer -> client, and a hairpin's arrival (see deliver4). */
static __attribute__((noinline)) int peer_down6(struct xdp_md *ctx, const struct flow6 *in)
{
	__u16 old_csum = in->csum;
	__u32 n = in->n, extra = in->extra;
	__u32 up_slot = in->up_slot;
	struct tp_perm_key6 pk = {};
	__builtin_memcpy(pk.relay_ip, in->daddr, 16);
	__builtin_memcpy(pk.peer_ip, in->saddr, 16);
	pk.relay_port = in->dport;
	struct tp_perm6 *pm = bpf_map_lookup_elem(&tp_perms6, &pk);
	if (!pm)
		return pass(TP_PASS_NO_ENTRY);
	__u64 now = bpf_ktime_get_ns();
	if (!live(now, pm->deadline_ns))
		return pass(TP_PASS_EXPIRED);
	if (!up_slot && denied_port(in->sport))
		return pass(TP_PASS_DENIED_PORT);
	struct tp_peer_key6 qk = {};
	__builtin_memcpy(qk.relay_ip, in->daddr, 16);
	__builtin_memcpy(qk.peer_ip, in->saddr, 16);
	qk.relay_port = in->dport;
	qk.peer_port = in->sport;
	struct tp_peer *q = bpf_map_lookup_elem(&tp_peers6, &qk);
	int channel = q && live(now, q->deadline_ns);
	__u32 grow = channel ? CHANNEL_HEADER : DATA_IND_HEADER6;
	__u32 pad = channel ? 0 : (4 - (n & 3)) & 3;
	__u32 stat = channel ? TP_RELAYED_CHANNEL_DOWN : TP_RELAYED_DATA_DOWN;
	if (up_slot)
		stat = channel ? TP_RELAYED_HAIRPIN_CHANNEL : TP_RELAYED_HAIRPIN_DATA;
	struct out6 o = {
		.flow = {
			.sport = pm->client.server_port,
			.dport = pm->client.client_port,
			.ulen = bpf_htons(n + grow + pad + sizeof(struct udphdr)),
		},
		.r = {
			.slot = pm->slot,
			.payload = n,
			.stat = stat,
			.down = 1,
			.up_slot = up_slot,
		},
	};
	__builtin_memcpy(o.flow.saddr, pm->client.server_ip, 16);
	__builtin_memcpy(o.flow.daddr, pm->client.client_ip, 16);
	__u16 ch = channel ? q->channel : 0;
	struct bpf_fib_lookup fib;
	int why = route6(ctx, &o, &fib, now);
	if (why)
		return pass(why);
	/* A wildcard listener: the route lookup supplied the source. */
	__builtin_memcpy(o.flow.saddr, fib.ipv6_src, 16);
	why = resize(ctx, (int)in->head - (int)grow, (int)pad - (int)extra);
	if (why)
		return pass(why);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *h = data + HEADERS6;
	__u64 s = (__u16)~old_csum;
	s = csum_swap6(s, in, &o.flow);
	if (channel ? put_channel_header(h, end, ch, n, &s)
		    : put_data_ind(ctx, h, end, HEADERS6, in->saddr, in->sport, 1, n, pad, &s))
		return XDP_DROP;
	o.r.csum = finish_csum(old_csum, s);
	return emit6(ctx, &o, &fib);
}

/* Set in received_csum's result with a reason to pass the frame. */
#define TP_CSUM_PASS (1U << 16)

/* The UDP checksum of the received datagram (`v6`: IPv6, else IPv4 without options;
 * the caller has checked its lengths), as one the program can update incrementally,
 * or TP_CSUM_PASS | the reason to pass the frame.
 *
 * A sender on this host (through a veth with transmit checksum offload, the default)
 * leaves a partial checksum: the pseudo-header's sum alone, for the "hardware" to
 * complete over the UDP header and payload. Updated incrementally, it would go out
 * wrong and the receiver would drop it. XDP cannot see the skb's CHECKSUM_PARTIAL, so
 * such a checksum is recognised by its value and completed here as the hardware would:
 * the sum of the datagram as it lies (its checksum field holds the pseudo-header's
 * sum). A complete checksum that happens to have that value is recomputed to itself.
 * A BPF function of its own, so that its stack is not added to the paths'. */
static __attribute__((noinline)) __u32 received_csum(struct xdp_md *ctx, int v6)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u64 pseudo = bpf_htons(IPPROTO_UDP);
	struct udphdr *udp;
	if (v6) {
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end)
			return TP_CSUM_PASS | TP_PASS_MALFORMED;
		/* The pseudo-header's length is 32 bits; its upper half is 0 here. */
		pseudo = sum_addr(pseudo, (const __u8 *)&ip6->saddr, 0);
		pseudo = sum_addr(pseudo, (const __u8 *)&ip6->daddr, 0);
	} else {
		struct iphdr *ip = data + sizeof(struct ethhdr);
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return TP_CSUM_PASS | TP_PASS_MALFORMED;
		pseudo = add32(add32(pseudo, ip->saddr), ip->daddr);
	}
	__u16 csum = udp->check;
	__u16 ulen = udp->len;
	if (csum == 0 || csum != fold(add16(pseudo, ulen)))
		return csum;
	__u32 ifindex = ctx->ingress_ifindex;
	if (bpf_map_lookup_elem(&tp_generic_ifs, &ifindex))
		return TP_CSUM_PASS | TP_PASS_PARTIAL_CSUM;
	__u64 sum = frame_sum(ctx, (void *)udp - data, bpf_ntohs(ulen));
	if (!sum)
		return TP_CSUM_PASS | TP_PASS_PARTIAL_CSUM;
	stat_add(TP_CSUM_COMPLETED, 1);
	csum = ~fold(sum);
	return csum ? csum : 0xffff;
}

/* Its three paths are functions of their own (BPF-to-BPF calls), as is the IPv4 path
 * (relay4): inlined together, their stacks would add up beyond the 512 bytes a program
 * has. */
static __always_inline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip = data + sizeof(struct ethhdr);
	if ((void *)(ip + 1) > end)
		return pass(TP_PASS_MALFORMED);
	if (ip->nexthdr == 44)
		return pass(TP_PASS_FRAGMENT);
	if (ip->nexthdr != IPPROTO_UDP)
		return pass(TP_PASS_NOT_UDP); /* extension headers included */
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return pass(TP_PASS_MALFORMED);
	__u32 n, extra;
	int why = udp_lengths(udp, end, bpf_ntohs(ip->payload_len), &n, &extra);
	if (why)
		return pass(why);
	/* A UDP checksum is mandatory over IPv6. */
	if (udp->check == 0)
		return pass(TP_PASS_MALFORMED);
	/* The received datagram, described in a per-CPU value rather than on the stack,
	 * which the paths below need nearly all of. */
	__u32 zero = 0;
	struct flow6 *in = bpf_map_lookup_elem(&tp_flow6, &zero);
	if (!in)
		return pass(TP_PASS_UNSUPPORTED);
	in->sport = udp->source;
	in->dport = udp->dest;
	in->ulen = udp->len;
	in->n = n;
	in->extra = extra;
	in->head = 0;
	in->up_slot = 0;
	__builtin_memcpy(in->saddr, &ip->saddr, 16);
	__builtin_memcpy(in->daddr, &ip->daddr, 16);
	__u32 csum = received_csum(ctx, 1);
	if (csum & TP_CSUM_PASS)
		return pass(csum & ~TP_CSUM_PASS);
	in->csum = csum;
	int kind = payload_kind((void *)(udp + 1), n, end);
	int r = -1;
	if (kind == KIND_CHANNEL) {
		r = channel_up6(ctx, in);
		if (r >= 0)
			return r;
	} else if (kind == KIND_SEND) {
		r = send_up6(ctx, in);
		if (r != TP_HAIRPIN)
			return r;
	}
	if (r == TP_HAIRPIN) {
		struct flow6 *a = bpf_map_lookup_elem(&tp_arrival6, &zero);
		if (!a)
			return pass(TP_PASS_UNSUPPORTED);
		return peer_down6(ctx, a);
	}
	return peer_down6(ctx, in);
}

/* The IPv4 path, a function of its own (see relay6). */
static __attribute__((noinline)) int relay4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return pass(TP_PASS_NOT_UDP);
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return pass(TP_PASS_NOT_UDP);
	if (ip->ihl != 5)
		return pass(TP_PASS_IP_OPTIONS);
	if (ip->frag_off & bpf_htons(0x3fff))
		return pass(TP_PASS_FRAGMENT);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return pass(TP_PASS_MALFORMED);
	__u32 n, extra;
	int why = udp_lengths(udp, end, (__u32)bpf_ntohs(ip->tot_len) - sizeof(*ip), &n, &extra);
	if (why)
		return pass(why);
	struct flow in = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.sport = udp->source,
		.dport = udp->dest,
		.ulen = udp->len,
	};
	__u32 csum = received_csum(ctx, 0);
	if (csum & TP_CSUM_PASS)
		return pass(csum & ~TP_CSUM_PASS);
	__u16 old_csum = csum;
	__u32 zero = 0;
	struct arrival *a = bpf_map_lookup_elem(&tp_arrival, &zero);
	if (!a)
		return pass(TP_PASS_UNSUPPORTED);
	__u8 *p = (void *)(udp + 1);
	int kind = payload_kind(p, n, end);
	if (kind == KIND_CHANNEL) {
		int r = channel_up(ctx, &in, old_csum, p, n, extra, end, a);
		if (r >= 0)
			return r;
		if (r == TP_HAIRPIN)
			return deliver4(ctx, a);
	} else if (kind == KIND_SEND) {
		int r = send_up(ctx, &in, old_csum, n, extra, a);
		if (r != TP_HAIRPIN)
			return r;
		return deliver4(ctx, a);
	}
	/* peer -> client */
	a->flow = in;
	a->now = bpf_ktime_get_ns();
	a->csum = old_csum;
	a->n = n;
	a->head = 0;
	a->tail = extra;
	a->up_slot = 0;
	return deliver4(ctx, a);
}

SEC("xdp")
int turnpike_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return pass(TP_PASS_NOT_UDP);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return relay4(ctx);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(ctx);
	return pass(TP_PASS_NOT_UDP);
}

/* bpf_fib_lookup is for GPL-compatible programs: this one is offered under either. */
char LICENSE[] SEC("license") = "GPL";
