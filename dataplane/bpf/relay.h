/* The maps the XDP relay shares with the data plane's workers.
 *
 * The Rust side is generated from this file by dataplane/build.rs: every struct as a
 * #[repr(C)] struct (tp_chan_key is TpChanKey, fields keep their names), every #define
 * with a value and every enumerator as a constant, with the layout checked field by
 * field against both rustc and clang. A change here is a change in Rust: a renamed or
 * retyped field fails the build where the loader uses it. The syntax is restricted to
 * what the generator reads (dataplane/src/xdp/abi_gen.rs): structs of __u8, __u16,
 * __u32, __u64, arrays of them with a literal length and structs defined earlier, with
 * every padding byte an explicit _pad field; #define NAME with an integer expression
 * of literals and earlier constants (a u64 in Rust with an ULL literal, a u32 else,
 * unless cast as ((__u8)1)); enums of literal values; C comments (the one before an
 * item, or after a field on its line, is its doc in Rust). No other C here.
 *
 * Addresses and ports are in network byte order, as on the wire; channel numbers and
 * slots in host order. Padding fields are zero. Deadlines are CLOCK_MONOTONIC
 * nanoseconds (bpf_ktime_get_ns): an entry is used only while now < deadline. */
#ifndef TURNPIKE_RELAY_H
#define TURNPIKE_RELAY_H

#include <linux/types.h>

/* A UDP client's 5-tuple: the client and the listening address it sends to. */
struct tp_client {
	__u32 client_ip;
	__u32 server_ip;
	__u16 client_port;
	__u16 server_port;
};

/* tp_allocs value: the allocation of a client (for Send indications). */
struct tp_alloc {
	__u64 deadline_ns;
	__u32 relay_ip;
	__u16 relay_port;
	__u8 flags;
	__u8 _pad;
	__u32 slot;
	__u32 _pad2;
};

/* tp_chans key: a channel of a client, client -> peer. */
struct tp_chan_key {
	struct tp_client client;
	__u16 channel;
	__u16 _pad;
};

/* tp_chans value: where that channel's data goes. The deadline is the earliest of the
 * allocation's, the channel's and the permission's for the peer's IP. */
struct tp_chan {
	__u64 deadline_ns;
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;
	__u8 flags;
	__u8 _pad[7];
};

/* tp_perms key: a permission of a relayed address for a peer IP. */
struct tp_perm_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 _pad;
};

/* tp_perms value: the client the relayed address belongs to. The deadline is the
 * earliest of the allocation's and the permission's. */
struct tp_perm {
	__u64 deadline_ns;
	struct tp_client client;
	__u32 slot;
};

/* tp_peers key: a peer transport address with a confirmed channel, peer -> client. */
struct tp_peer_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
};

/* tp_peers value: the channel number (the deadline as in tp_chans). */
struct tp_peer {
	__u64 deadline_ns;
	__u16 channel;
	__u16 _pad[3];
};

/* IPv6 (RFC 6156): the same maps with 16-byte addresses, for allocations whose client,
 * listening and relayed addresses are all IPv6 (a mixed-family flow stays with the
 * workers). */
struct tp_client6 {
	__u8 client_ip[16];
	__u8 server_ip[16];
	__u16 client_port;
	__u16 server_port;
};

struct tp_alloc6 {
	__u64 deadline_ns;
	__u8 relay_ip[16];
	__u16 relay_port;
	__u8 flags;
	__u8 _pad;
	__u32 slot;
};

struct tp_chan_key6 {
	struct tp_client6 client;
	__u16 channel;
	__u16 _pad;
};

struct tp_chan6 {
	__u64 deadline_ns;
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;
	__u8 flags;
	__u8 _pad[7];
};

struct tp_perm_key6 {
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__u16 relay_port;
	__u16 _pad;
};

struct tp_perm6 {
	__u64 deadline_ns;
	struct tp_client6 client;
	__u32 slot;
};

struct tp_peer_key6 {
	__u8 relay_ip[16];
	__u8 peer_ip[16];
	__u16 relay_port;
	__u16 peer_port;
};
/* tp_peers6 values are struct tp_peer. */

/* tp_usage value (per CPU, indexed by slot): what the program relayed for one
 * allocation, application bytes. */
struct tp_usage {
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 to_client_packets;
	__u64 to_client_bytes;
};

/* Allocation flags. */
#define TP_FLAG_DONT_FRAGMENT ((__u8)1)

/* tp_stats indexes (per CPU u64 counters). A counter's name (metrics, `turnpike xdp`)
 * is its enumerator's, lowercased, without TP_PASS_ or TP_. */
enum tp_stat {
	TP_RELAYED_CHANNEL_UP = 0,  /* ChannelData client -> peer */
	TP_RELAYED_SEND_UP,         /* Send indication client -> peer */
	TP_RELAYED_CHANNEL_DOWN,    /* peer -> client as ChannelData */
	TP_RELAYED_DATA_DOWN,       /* peer -> client as a Data indication */
	TP_RELAYED_HAIRPIN_CHANNEL, /* client -> another client of this relay, as ChannelData */
	TP_RELAYED_HAIRPIN_DATA,    /* client -> another client of this relay, as a Data indication */
	TP_BYTES_UP,                /* application bytes relayed client -> peer (hairpins too) */
	TP_BYTES_DOWN,              /* application bytes relayed peer -> client (hairpins too) */
	TP_PASS_NOT_UDP,            /* not IPv4/UDP (ARP, TCP, IPv6, VLAN...) */
	TP_PASS_IP_OPTIONS,         /* IPv4 with options */
	TP_PASS_FRAGMENT,           /* an IPv4 fragment */
	TP_PASS_NO_ENTRY,           /* no allocation, channel or permission in the maps */
	TP_PASS_EXPIRED,            /* the entry's deadline has passed */
	TP_PASS_UNSUPPORTED,        /* a STUN message the program leaves to the workers */
	TP_PASS_MALFORMED,          /* lengths that do not add up */
	TP_PASS_NO_ROUTE,           /* no route or no neighbour entry yet, or local */
	TP_PASS_TOO_BIG,            /* larger than the egress MTU */
	TP_PASS_HEADROOM,           /* the frame could not be resized */
	TP_PASS_DENIED_PORT,        /* a peer port of the server's own sockets */
	TP_PASS_FORWARDING_OFF,     /* bpf_fib_lookup: forwarding is off on the interface */
	TP_PASS_PARTIAL_CSUM,       /* a partial checksum in generic mode, or over more than TP_CSUM_MAX bytes */
	TP_CSUM_COMPLETED,          /* partial checksums completed (not a pass reason) */
	TP_STAT_MAX,
};

/* tp_deny_ports: a bitmap of ports (host order, bit port & 31 of word port >> 5): a
 * datagram to or from a peer on one of them is left to the workers, which check the
 * server's own sockets exactly. */
#define TP_DENY_WORDS 2048

/* tp_hops, tp_hops6: the next hops bpf_fib_lookup found, kept for TP_HOP_TTL_NS (LRU
 * maps). A hit costs one hash lookup instead of a route and a neighbour lookup; a route
 * or neighbour change is seen within the TTL. An entry also records the largest IP
 * packet the lookup allowed (its MTU check): a larger one looks the route up again. */
struct tp_hop_key {
	__u32 ifindex; /* where the packet came in */
	__u32 src;
	__u32 dst;
};

struct tp_hop_key6 {
	__u32 ifindex;
	__u8 src[16];
	__u8 dst[16];
};

struct tp_hop {
	__u64 expires_ns; /* CLOCK_MONOTONIC */
	__u32 ifindex;    /* out */
	__u32 src;        /* IPv4: the source the lookup chose, for a key without one */
	__u16 max_len;    /* the largest IP packet (tot_len) known to fit */
	__u8 dmac[6];
	__u8 smac[6];
	__u8 _pad[2];
};

struct tp_hop6 {
	struct tp_hop hop;
	__u8 src[16]; /* the source the lookup chose, for a key without one */
};

#define TP_HOP_TTL_NS 100000000ULL
#define TP_MAX_HOPS 16384

/* A datagram from a sender on the same host (a veth with transmit checksum offload,
 * the default) carries a partial UDP checksum: only the pseudo-header's sum, which the
 * "hardware" was to complete. The program completes it by summing the UDP datagram in
 * chunks of TP_CSUM_CHUNK bytes, up to TP_CSUM_MAX bytes (a jumbo frame); a longer
 * one is passed. */
#define TP_CSUM_CHUNK 256
#define TP_CSUM_MAX (TP_CSUM_CHUNK * 36)

#define TP_MAX_SLOTS 65536
#define TP_MAX_ALLOCS 65536
#define TP_MAX_ENTRIES 262144

#endif
