// kube-proxy-agent eBPF datapath (compiled by bcc at start-up). Layout version: see LAYOUT in
// layout.py; every map is pinned under __PIN__ (the version is part of that path, so a new
// layout never reuses an old map).
//
// Socket hooks (cgroup sock_addr): connect4/6 and sendmsg4/6 rewrite a service address to a
// backend before the first packet exists; recvmsg4/6 and getpeername4/6 show the service address
// again. tc programs on the node's interfaces: ingress DNATs traffic from outside to a backend
// (NodePorts, external and load-balancer IPs, and cluster IPs reached from outside), egress undoes
// it on the replies.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define F_REJECT 1        // no backend: refuse (connection refused)
#define F_DROP 2          // no backend here but elsewhere (a Local policy): drop
#define F_MASQ 4          // tc: masquerade (externalTrafficPolicy Cluster)
#define F_MASQ_OUTSIDE 8  // tc: masquerade unless the source is in a cluster CIDR (cluster IPs)
#define F_RANGES 16       // tc: only sources in loadBalancerSourceRanges
#define CT_MASQ 1         // ct_val.flags: the flow is masqueraded
#define CT_CLOSED 2       // ct_val.flags: the client ended the connection (FIN or RST seen)
#define MASQ_MARK 0x4000
#define ECONNREFUSED_ 111

struct svc_key {
    __u32 addr[4];
    __u16 port;    // network order
    __u8 proto;
    __u8 scope;    // 0: sockets (this node's pods and processes), 1: tc (from outside)
    __u16 slot;    // 0: the master entry; 1..count: backends
    __u16 family;  // 4 or 6
};
struct svc_val {
    __u32 backend_id;  // slots
    __u16 count;       // master: number of backends
    __u16 flags;       // master: F_*
    __u32 affinity;    // master: ClientIP affinity timeout, seconds (0: none)
    __u32 svc_id;      // master: this frontend's id (affinity, source ranges)
};
struct backend {
    __u32 addr[4];
    __u16 port;  // network order
    __u8 proto;
    __u8 family;
};
struct sock_key {  // (socket cookie, peer) -> the service address the application asked for
    __u64 cookie;
    __u32 addr[4];
    __u16 port;
    __u16 pad;
    __u32 pad2;
};
struct vip {
    __u32 addr[4];
    __u16 port;
    __u16 pad;
    __u32 backend_id;
};
struct aff_key {
    __u64 cookie;  // network namespace cookie (sockets) or 0 (tc: the client address below)
    __u32 client[4];
    __u32 svc_id;
    __u32 pad;
};
struct aff_val {
    __u32 backend_id;
    __u32 pad;
    __u64 last;  // ns
};
struct ct_key {
    __u32 saddr[4];
    __u32 daddr[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 pad[3];
};
struct ct_val {
    __u32 addr[4];
    __u16 port;
    __u16 flags;
};
struct lpm_key {
    __u32 prefixlen;
    __u32 id;  // svc_id (source ranges) or 0xC0000000|family (cluster CIDRs)
    __u32 addr[4];
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, svcs, 1048576, "__PIN__/svcs");
BPF_TABLE_PINNED("hash", __u32, struct backend, backends, 1048576, "__PIN__/backends");
BPF_TABLE_PINNED("lru_hash", struct sock_key, struct vip, revnat, 262144, "__PIN__/revnat");
BPF_TABLE_PINNED("lru_hash", struct sock_key, struct vip, udpflows, 262144, "__PIN__/udpflows");
BPF_TABLE_PINNED("lru_hash", struct aff_key, struct aff_val, affinity, 262144, "__PIN__/affinity");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, ct_fwd, 524288, "__PIN__/ct_fwd");  // client->vip: backend
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, ct_rev, 524288, "__PIN__/ct_rev");  // backend->client: vip
BPF_F_TABLE("lpm_trie:__PIN__/ranges", struct lpm_key, __u8, ranges, 65536, BPF_F_NO_PREALLOC);

// bcc declares some of these with narrower types: our own declarations
static __u64 (*kpa_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*kpa_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;
static long (*kpa_set_retval)(int retval) = (void *)BPF_FUNC_set_retval;

static __always_inline struct backend *pick(struct svc_key *key, struct svc_val *m, __u64 cookie, __u32 *client,
                                            __u32 *id_out) {
    __u32 id = 0;
    struct backend *b = 0;
    struct aff_key ak = {};
    if (m->affinity) {
        ak.cookie = cookie;
        ak.client[0] = client[0];
        ak.client[1] = client[1];
        ak.client[2] = client[2];
        ak.client[3] = client[3];
        ak.svc_id = m->svc_id;
        struct aff_val *av = affinity.lookup(&ak);
        if (av && bpf_ktime_get_ns() - av->last < (__u64)m->affinity * 1000000000ULL) {
            id = av->backend_id;
            b = backends.lookup(&id);
        }
    }
    if (!b) {
        struct svc_key sk = *key;
        sk.slot = (bpf_get_prandom_u32() % m->count) + 1;
        struct svc_val *slot = svcs.lookup(&sk);
        if (!slot)
            return 0;
        id = slot->backend_id;
        b = backends.lookup(&id);
        if (!b)
            return 0;
    }
    if (m->affinity) {
        struct aff_val nv = {.backend_id = id, .last = bpf_ktime_get_ns()};
        affinity.update(&ak, &nv);
    }
    *id_out = id;
    return b;
}

// -- socket hooks -------------------------------------------------------------------------------

static __always_inline int sock_lb(struct bpf_sock_addr *ctx, int family, int sendmsg) {
    struct svc_key key = {};
    if (family == 4) {
        key.addr[0] = ctx->user_ip4;
    } else {
        key.addr[0] = ctx->user_ip6[0];
        key.addr[1] = ctx->user_ip6[1];
        key.addr[2] = ctx->user_ip6[2];
        key.addr[3] = ctx->user_ip6[3];
    }
    key.port = (__u16)ctx->user_port;
    key.proto = ctx->protocol;
    key.family = family;
    struct svc_val *m = svcs.lookup(&key);
    if (!m)
        return 1;
    if (m->count == 0) {
        if (m->flags & F_REJECT) {
            kpa_set_retval(-ECONNREFUSED_);
            return 0;
        }
        return 1;  // F_DROP: sent to the service address, where nothing answers
    }
    __u64 cookie = kpa_socket_cookie(ctx);
    struct sock_key fk = {.cookie = cookie, .port = key.port};
    fk.addr[0] = key.addr[0];
    fk.addr[1] = key.addr[1];
    fk.addr[2] = key.addr[2];
    fk.addr[3] = key.addr[3];
    struct backend *b = 0;
    __u32 id = 0;
    if (sendmsg) {  // unconnected UDP: one backend per (socket, service), not one per datagram
        struct vip *flow = udpflows.lookup(&fk);
        if (flow) {
            id = flow->backend_id;
            b = backends.lookup(&id);
        }
    }
    if (!b) {
        __u32 none[4] = {};
        b = pick(&key, m, kpa_netns_cookie(ctx), none, &id);
        if (!b)
            return 1;
        if (sendmsg) {
            struct vip nf = {.backend_id = id};
            udpflows.update(&fk, &nf);
        }
    }
    struct sock_key rk = {.cookie = cookie, .port = b->port};
    rk.addr[0] = b->addr[0];
    rk.addr[1] = b->addr[1];
    rk.addr[2] = b->addr[2];
    rk.addr[3] = b->addr[3];
    struct vip v = {.port = key.port, .backend_id = id};
    v.addr[0] = key.addr[0];
    v.addr[1] = key.addr[1];
    v.addr[2] = key.addr[2];
    v.addr[3] = key.addr[3];
    revnat.update(&rk, &v);
    if (family == 4) {
        ctx->user_ip4 = b->addr[0];
    } else {
        ctx->user_ip6[0] = b->addr[0];
        ctx->user_ip6[1] = b->addr[1];
        ctx->user_ip6[2] = b->addr[2];
        ctx->user_ip6[3] = b->addr[3];
    }
    ctx->user_port = b->port;
    return 1;
}

static __always_inline int sock_revnat(struct bpf_sock_addr *ctx, int family) {
    struct sock_key rk = {.cookie = kpa_socket_cookie(ctx), .port = (__u16)ctx->user_port};
    if (family == 4) {
        rk.addr[0] = ctx->user_ip4;
    } else {
        rk.addr[0] = ctx->user_ip6[0];
        rk.addr[1] = ctx->user_ip6[1];
        rk.addr[2] = ctx->user_ip6[2];
        rk.addr[3] = ctx->user_ip6[3];
    }
    struct vip *v = revnat.lookup(&rk);
    if (!v)
        return 1;
    if (family == 4) {
        ctx->user_ip4 = v->addr[0];
    } else {
        ctx->user_ip6[0] = v->addr[0];
        ctx->user_ip6[1] = v->addr[1];
        ctx->user_ip6[2] = v->addr[2];
        ctx->user_ip6[3] = v->addr[3];
    }
    ctx->user_port = v->port;
    return 1;
}

int kpa_connect4(struct bpf_sock_addr *ctx) { return sock_lb(ctx, 4, 0); }
int kpa_connect6(struct bpf_sock_addr *ctx) { return sock_lb(ctx, 6, 0); }
int kpa_sendmsg4(struct bpf_sock_addr *ctx) { return sock_lb(ctx, 4, 1); }
int kpa_sendmsg6(struct bpf_sock_addr *ctx) { return sock_lb(ctx, 6, 1); }
int kpa_recvmsg4(struct bpf_sock_addr *ctx) { return sock_revnat(ctx, 4); }
int kpa_recvmsg6(struct bpf_sock_addr *ctx) { return sock_revnat(ctx, 6); }
int kpa_peer4(struct bpf_sock_addr *ctx) { return sock_revnat(ctx, 4); }
int kpa_peer6(struct bpf_sock_addr *ctx) { return sock_revnat(ctx, 6); }

// -- tc: traffic from outside -------------------------------------------------------------------

struct pkt {
    __u32 saddr[4];
    __u32 daddr[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u32 l3;  // offset of the IP header
    __u32 l4;  // offset of the TCP/UDP header
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return 0;
    p->l3 = sizeof(struct ethhdr);
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = data + sizeof(struct ethhdr);
        if ((void *)(ip + 1) > end)
            return 0;
        if (ip->ihl < 5 || (ip->frag_off & htons(0x3FFF)))
            return 0;  // fragments are left to the stack
        p->family = 4;
        p->proto = ip->protocol;
        p->saddr[0] = ip->saddr;
        p->daddr[0] = ip->daddr;
        p->l4 = p->l3 + ip->ihl * 4;
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
        if ((void *)(ip6 + 1) > end)
            return 0;
        p->family = 6;
        p->proto = ip6->nexthdr;  // extension headers are left to the stack
        __builtin_memcpy(p->saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->daddr, &ip6->daddr, 16);
        p->l4 = p->l3 + sizeof(struct ipv6hdr);
    } else {
        return 0;
    }
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return 0;
    __u16 ports[2];
    if (bpf_skb_load_bytes(skb, p->l4, ports, 4) < 0)
        return 0;
    p->sport = ports[0];
    p->dport = ports[1];
    return 1;
}

static __always_inline __u32 csum_off(struct pkt *p) {
    return p->l4 + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
}

// Rewrite the destination (dst=1) or source address and port of a packet, checksums included.
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, int dst, __u32 *addr, __u16 port) {
    __u32 *old = dst ? p->daddr : p->saddr;
    __u16 old_port = dst ? p->dport : p->sport;
    __u32 l4flags = BPF_F_PSEUDO_HDR | (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
    __u32 port_off = p->l4 + (dst ? 2 : 0);
    if (p->family == 4) {
        __u32 addr_off = p->l3 + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
        if (bpf_l4_csum_replace(skb, csum_off(p), old[0], addr[0], l4flags | 4) < 0)
            return 0;
        if (bpf_l3_csum_replace(skb, p->l3 + offsetof(struct iphdr, check), old[0], addr[0], 4) < 0)
            return 0;
        if (bpf_skb_store_bytes(skb, addr_off, addr, 4, 0) < 0)
            return 0;
    } else {
        __u32 addr_off = p->l3 + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
        __s64 diff = bpf_csum_diff(old, 16, addr, 16, 0);
        if (bpf_l4_csum_replace(skb, csum_off(p), 0, diff, l4flags) < 0)
            return 0;
        if (bpf_skb_store_bytes(skb, addr_off, addr, 16, 0) < 0)
            return 0;
    }
    if (port != old_port) {
        if (bpf_l4_csum_replace(skb, csum_off(p), old_port, port, (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | 2) < 0)
            return 0;
        if (bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0)
            return 0;
    }
    return 1;
}

static __always_inline int in_cluster(struct pkt *p) {
    struct lpm_key k = {.prefixlen = 32 + (p->family == 4 ? 32 : 128), .id = 0xC0000000 | p->family};
    __builtin_memcpy(k.addr, p->saddr, 16);
    return ranges.lookup(&k) != 0;
}

static __always_inline int in_ranges(struct pkt *p, __u32 svc_id) {
    struct lpm_key k = {.prefixlen = 32 + (p->family == 4 ? 32 : 128), .id = svc_id};
    __builtin_memcpy(k.addr, p->saddr, 16);
    return ranges.lookup(&k) != 0;
}

int kpa_tc_ingress(struct __sk_buff *skb) {
    struct pkt p = {};
    if (!parse(skb, &p))
        return TC_ACT_OK;
    struct ct_key fk = {.sport = p.sport, .dport = p.dport, .proto = p.proto};
    __builtin_memcpy(fk.saddr, p.saddr, 16);
    __builtin_memcpy(fk.daddr, p.daddr, 16);
    // TCP: a SYN (without ACK) on a flow whose last connection ended (the client's FIN or RST
    // was seen: CT_CLOSED) opens a new connection, balanced afresh: a client port used again must
    // not inherit a backend that may be gone. A retransmitted SYN keeps its backend. A packet in
    // the middle of a connection this program never saw (opened before the mode started, as a
    // mode switch leaves them) stays with the stack, whose conntrack entry keeps its backend.
    __u8 tcp_flags = 0;
    if (p.proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, p.l4 + 13, &tcp_flags, 1) < 0)
        return TC_ACT_OK;
    int tcp = p.proto == IPPROTO_TCP;
    int syn = tcp && (tcp_flags & 0x12) == 0x02;
    struct ct_val *known = ct_fwd.lookup(&fk);
    if (known && syn && (known->flags & CT_CLOSED))
        known = 0;
    struct ct_val to = {};
    if (known) {  // a flow already sent to a backend keeps it
        if (tcp && (tcp_flags & 0x05))  // FIN or RST from the client: the connection ends
            known->flags |= CT_CLOSED;
        to = *known;
    } else {
        if (tcp && !syn)
            return TC_ACT_OK;
        struct svc_key key = {.port = p.dport, .proto = p.proto, .scope = 1, .family = p.family};
        __builtin_memcpy(key.addr, p.daddr, 16);
        struct svc_val *m = svcs.lookup(&key);
        if (!m)
            return TC_ACT_OK;
        if ((m->flags & F_RANGES) && !in_ranges(&p, m->svc_id))
            return TC_ACT_SHOT;
        if (m->count == 0)  // reject: up the stack (no listener there: refused); drop: drop
            return (m->flags & F_DROP) ? TC_ACT_SHOT : TC_ACT_OK;
        __u32 id = 0;
        struct backend *b = pick(&key, m, 0, p.saddr, &id);
        if (!b)
            return TC_ACT_OK;
        __builtin_memcpy(to.addr, b->addr, 16);
        to.port = b->port;
        if ((m->flags & F_MASQ) || ((m->flags & F_MASQ_OUTSIDE) && !in_cluster(&p)))
            to.flags = CT_MASQ;
        ct_fwd.update(&fk, &to);
        struct ct_key rk = {.sport = to.port, .dport = p.sport, .proto = p.proto};
        __builtin_memcpy(rk.saddr, to.addr, 16);
        __builtin_memcpy(rk.daddr, p.saddr, 16);
        struct ct_val back = {.port = p.dport};
        __builtin_memcpy(back.addr, p.daddr, 16);
        ct_rev.update(&rk, &back);
    }
    if (to.flags & CT_MASQ)
        skb->mark |= MASQ_MARK;  // netfilter masquerades it (the mode's one nat rule)
    if (!rewrite(skb, &p, 1, to.addr, to.port))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

int kpa_tc_egress(struct __sk_buff *skb) {
    struct pkt p = {};
    if (!parse(skb, &p))
        return TC_ACT_OK;
    struct ct_key rk = {.sport = p.sport, .dport = p.dport, .proto = p.proto};
    __builtin_memcpy(rk.saddr, p.saddr, 16);
    __builtin_memcpy(rk.daddr, p.daddr, 16);
    struct ct_val *v = ct_rev.lookup(&rk);
    if (!v)
        return TC_ACT_OK;
    struct ct_val back = *v;
    if (!rewrite(skb, &p, 0, back.addr, back.port))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
