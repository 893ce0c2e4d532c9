// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Webb socket-level datapath: service load balancing and L3/L4 policy at
 * connect() time, before a single packet exists.
 *
 * Only UAPI headers are used (struct bpf_sock_addr is stable ABI), so the
 * object needs no vmlinux.h and no CO-RE relocation to load on any kernel
 * with cgroup sock_addr hooks (>= 4.17) and ring buffers (>= 5.8).
 *
 * Map layouts and the shared enums are mirrored in datapath/maps.py; the loader
 * checks them against this object's BTF before it loads or adopts anything.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "webb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEBB_MAX_SERVICES);
	__type(key, struct service_key);
	__type(value, struct service_value);
} webb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEBB_MAX_BACKENDS);
	__type(key, struct backend_key);
	__type(value, struct backend_value);
} webb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEBB_MAX_ENDPOINTS);
	__type(key, struct webb_addr);		/* pod IP */
	__type(value, struct endpoint_value);
} webb_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEBB_MAX_ENDPOINTS);
	__type(key, __u64);			/* cgroup v2 id of the pod */
	__type(value, struct endpoint_value);
} webb_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WEBB_MAX_POLICY);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} webb_policy SEC(".maps");

/* Original destination per (socket, rewritten peer), so getpeername() and
 * recvmsg() show the VIP. Keyed by peer too: one unconnected UDP socket may
 * talk to several services. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct revnat_key);
	__type(value, struct orig_dst);
} webb_revnat SEC(".maps");

/* One listener for every L7 service port of the node: the proxy learns which
 * service a connection is for by getsockopt(SO_ORIGINAL_DST), answered from
 * here (as iptables' REDIRECT would have it). connect() knows the socket's
 * cookie only, its port exists once the kernel picked it: connect writes
 * webb_l7_pending (cookie -> VIP), sockops moves it to webb_origdst (client
 * address and port -> VIP) when the connection is established, before the
 * proxy can accept it; the proxy's one read removes it. LRU: an entry never
 * read ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);			/* socket cookie of the client */
	__type(value, struct orig_dst);
} webb_l7_pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct peer_key);
	__type(value, struct orig_dst);
} webb_origdst SEC(".maps");

/* ClientIP session affinity: a pod is its network namespace. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} webb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEBB_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} webb_reason_counts SEC(".maps");

/* Same-node acceleration (opt-in, see __sockops): sockets of pod-to-pod
 * connections of this node, so sk_msg can hand bytes to the peer socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} webb_sockhash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct webb_config);
} webb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEBB_ACCEL_MAX);
	__type(key, __u32);
	__type(value, __u64);
} webb_accel_counts SEC(".maps");

/* Digest of the object whose programs the pinned links run: a restarted
 * agent with the same object adopts everything without loading anything. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct webb_meta);
} webb_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} webb_events SEC(".maps");

/* flow_event is only ever a ring-buffer record, never a map type: this unused
 * pointer puts it into the object's BTF, where the loader checks it against
 * Python's layout like every other shared struct. */
struct flow_event *webb_flow_event_btf __attribute__((unused));
/* Likewise for the shared enums: the loader checks their members against Python's. */
struct webb_btf_enums *webb_enums_btf __attribute__((unused));

static __always_inline void __count(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&webb_reason_counts, &reason);

	if (n)
		*n += 1;
}

static __always_inline void __emit_cg(__u64 cgroup_id, __u32 src_identity,
				      const struct webb_addr *orig, __u16 orig_port,
				      const struct webb_addr *new, __u16 new_port,
				      __u32 dst_identity, __u8 proto, __u8 family, __u8 verdict,
				      __u8 reason)
{
	struct flow_event *e;

	__count(reason);
	/* A full ring buffer loses the event, never the connection; the loss
	 * is visible as the gap between reason counts and received events. */
	e = bpf_ringbuf_reserve(&webb_events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->src_identity = src_identity;
	e->dst_identity = dst_identity;
	e->orig = *orig;
	e->new = *new;
	e->orig_port = orig_port;
	e->new_port = new_port;
	e->verdict = verdict;
	e->reason = reason;
	e->proto = proto;
	e->family = family;
	bpf_ringbuf_submit(e, 0);
}

/*
 * The source pod of the calling task. Its own cgroup is the pod's in the embedded
 * mode; kubelet puts every container (the pause one too) in a child of the pod's
 * cgroup, one or two levels under kubepods by QoS class, so the ancestor
 * the agent knows is the pod. *cgid is the cgroup that matched (the task's own
 * when none did): events name the pod by it. Unknown: NULL (fail closed where
 * policy applies: no rule names WEBB_IDENTITY_UNKNOWN).
 */
static __always_inline struct endpoint_value *__source(__u64 *cgid)
{
	struct endpoint_value *src;
	__u64 id;
	int level;

	*cgid = bpf_get_current_cgroup_id();
	src = bpf_map_lookup_elem(&webb_cgroups, cgid);
	if (src)
		return src;
	/* from the root down: a pod's cgroup never holds another pod's, so the first
	 * known ancestor is the pod; the walk ends at the task's own cgroup (looked up
	 * above), a few levels down, not at the deepest level there could be */
	for (level = 1; level <= WEBB_MAX_CGROUP_LEVEL; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id || id == *cgid)
			break;
		src = bpf_map_lookup_elem(&webb_cgroups, &id);
		if (src) {
			*cgid = id;
			return src;
		}
	}
	return NULL;
}

/* An event of a socket call: ``cgid`` is the source pod's cgroup (__source). */
static __always_inline void __emit(__u64 cgid, __u32 src_identity, const struct webb_addr *orig,
				   __u16 orig_port, const struct webb_addr *new, __u16 new_port,
				   __u32 dst_identity, __u8 proto, __u8 family, __u8 verdict,
				   __u8 reason)
{
	__emit_cg(cgid, src_identity, orig, orig_port, new, new_port,
		  dst_identity, proto, family, verdict, reason);
}

static __always_inline int __addr_eq(const struct webb_addr *a, const struct webb_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* The destination of the call, in the one address form of the maps. The ctx
 * fields of the other family are off limits to the verifier: family is a
 * compile-time constant at every call site, so the other branch is gone. */
static __always_inline void __ctx_get(struct bpf_sock_addr *ctx, int family, struct webb_addr *a)
{
	if (family == 4) {
		a->w[0] = 0;
		a->w[1] = 0;
		a->w[2] = bpf_htonl(0xffff);
		a->w[3] = ctx->user_ip4;
	} else {
		a->w[0] = ctx->user_ip6[0];
		a->w[1] = ctx->user_ip6[1];
		a->w[2] = ctx->user_ip6[2];
		a->w[3] = ctx->user_ip6[3];
	}
}

static __always_inline void __ctx_set(struct bpf_sock_addr *ctx, int family,
				      const struct webb_addr *a, __u16 port)
{
	if (family == 4) {
		ctx->user_ip4 = a->w[3];
	} else {
		ctx->user_ip6[0] = a->w[0];
		ctx->user_ip6[1] = a->w[1];
		ctx->user_ip6[2] = a->w[2];
		ctx->user_ip6[3] = a->w[3];
	}
	ctx->user_port = port;
}

/* Returns 1 if the endpoint accepts src_identity on port/proto. */
/* The entry that allows src -> dst:port/proto, or NULL: exact, then any port,
 * then any source, then any source on that port. */
static __always_inline struct policy_value *__policy_lookup(__u32 src_identity, __u32 dst_identity,
							    __u16 port_host, __u8 proto)
{
	struct policy_key k = {
		.dst_identity = dst_identity,
		.src_identity = src_identity,
		.port = port_host,
		.proto = proto,
	};
	struct policy_value *v;

	v = bpf_map_lookup_elem(&webb_policy, &k);
	if (v)
		return v;
	k.port = 0;			/* rule without toPorts: any port */
	v = bpf_map_lookup_elem(&webb_policy, &k);
	if (v)
		return v;
	k.src_identity = 0;		/* rule from any endpoint */
	v = bpf_map_lookup_elem(&webb_policy, &k);
	if (v)
		return v;
	k.port = port_host;
	return bpf_map_lookup_elem(&webb_policy, &k);
}

/* 1: allowed; 0: no rule allows it; -1: allowed only through the node proxy
 * (the rule has L7 rules, which only Envoy can apply). */
static __always_inline int __policy_verdict(__u32 src_identity, const struct endpoint_value *dst,
					    __u16 port_host, __u8 proto)
{
	struct policy_value *v;

	if (!(dst->flags & WEBB_EP_INGRESS_ENFORCED))
		return 1;
	v = __policy_lookup(src_identity, dst->identity, port_host, proto);
	if (!v)
		return 0;
	return (v->flags & WEBB_POLICY_L7) ? -1 : 1;
}

/* Picks a backend slot: the affinity entry when it is fresh and its slot
 * still holds the same backend, else uniformly at random. */
static __always_inline struct backend_value *
__select_backend(struct bpf_sock_addr *ctx, const struct service_value *svc)
{
	struct backend_key bk = { .service_id = svc->service_id };
	struct affinity_key ak = {};
	struct affinity_value *av, nav = {};
	struct backend_value *be;
	__u64 now = 0;

	if (svc->affinity_timeout_s) {
		ak.netns_cookie = bpf_get_netns_cookie(ctx);
		ak.service_id = svc->service_id;
		now = bpf_ktime_get_ns();
		av = bpf_map_lookup_elem(&webb_affinity, &ak);
		if (av && now - av->last_ns < (__u64)svc->affinity_timeout_s * 1000000000ULL &&
		    av->slot < svc->backend_count) {
			bk.slot = av->slot;
			be = bpf_map_lookup_elem(&webb_backends, &bk);
			if (be && __addr_eq(&be->addr, &av->addr) && be->port == av->port) {
				av->last_ns = now;
				return be;
			}
		}
	}
	bk.slot = bpf_get_prandom_u32() % svc->backend_count;
	be = bpf_map_lookup_elem(&webb_backends, &bk);
	if (be && svc->affinity_timeout_s) {
		nav.addr = be->addr;
		nav.port = be->port;
		nav.slot = bk.slot;
		nav.last_ns = now;
		bpf_map_update_elem(&webb_affinity, &ak, &nav, BPF_ANY);
	}
	return be;
}

/* The one decision for connect and sendmsg, both families: returns 1 to let the
 * call go on (ctx possibly rewritten), 0 to fail it (ECONNREFUSED via retval,
 * else EPERM). */
static __always_inline int __sock_xlate(struct bpf_sock_addr *ctx, int family, __u8 proto,
					int per_datagram)
{
	struct webb_addr dst_addr, new_addr;
	__u16 dst_port = (__u16)ctx->user_port;	/* network order in low 16 bits */
	__u64 cgid;
	struct endpoint_value *src, *dst;
	struct service_value *svc;
	struct backend_value *be = NULL;
	struct service_key sk = {};
	__u32 src_identity = WEBB_IDENTITY_UNKNOWN;
	__u16 new_port = dst_port;
	__u8 verdict = WEBB_VERDICT_FORWARDED;
	__u8 reason = WEBB_REASON_DIRECT;

	__ctx_get(ctx, family, &dst_addr);
	new_addr = dst_addr;
	src = __source(&cgid);
	if (src && (src->flags & WEBB_EP_PROXY))
		return 1;	/* the node proxy (Envoy, the tunnel) as a pod: as if it ran on the host */
	if (src)
		src_identity = src->identity;

	sk.vip = dst_addr;
	sk.port = dst_port;
	sk.proto = proto;
	svc = bpf_map_lookup_elem(&webb_services, &sk);
	if (svc) {
		if (svc->backend_count == 0) {
			__emit(cgid, src_identity, &dst_addr, dst_port, &dst_addr, 0, 0, proto, family,
			       WEBB_VERDICT_DROPPED, WEBB_REASON_NO_BACKEND);
			/* like a closed port, not like a policy denial */
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		be = __select_backend(ctx, svc);
		if (!be) {
			/* The agent writes backends before the service entry,
			 * so a hole here means a bug in the agent: drop loudly. */
			__emit(cgid, src_identity, &dst_addr, dst_port, &dst_addr, 0, 0, proto, family,
			       WEBB_VERDICT_DROPPED, WEBB_REASON_BACKEND_MISSING);
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		new_addr = be->addr;
		new_port = be->port;
		reason = WEBB_REASON_SERVICE;
	}

	dst = bpf_map_lookup_elem(&webb_endpoints, &new_addr);
	if (dst) {
		int pv = __policy_verdict(src_identity, dst, bpf_ntohs(new_port), proto);

		if (pv < 0 && svc && svc->proxy_port)
			pv = 1;		/* to the node proxy, which applies the L7 rules */
		if (pv != 1) {
			if (!(dst->flags & WEBB_EP_AUDIT)) {
				__emit(cgid, src_identity, &dst_addr, dst_port, &new_addr, new_port,
				       dst->identity, proto, family, WEBB_VERDICT_DENIED,
				       pv ? WEBB_REASON_L7_BYPASS : WEBB_REASON_POLICY_DENIED);
				return 0;	/* EPERM */
			}
			verdict = WEBB_VERDICT_AUDIT;
			reason = WEBB_REASON_POLICY_AUDIT;
		}
	}

	if (svc && svc->proxy_port) {
		new_addr = svc->proxy;
		new_port = svc->proxy_port;
		if (verdict != WEBB_VERDICT_AUDIT)
			reason = WEBB_REASON_L7_PROXY;
		if (proto == IPPROTO_TCP) {
			__u64 cookie = bpf_get_socket_cookie(ctx);
			struct orig_dst vip = { .addr = dst_addr, .port = dst_port };

			bpf_map_update_elem(&webb_l7_pending, &cookie, &vip, BPF_ANY);
		}
	}
	if (svc) {
		struct revnat_key rk = {
			.cookie = bpf_get_socket_cookie(ctx),
			.addr = new_addr,
			.port = new_port,
		};
		struct orig_dst od = { .addr = dst_addr, .port = dst_port };

		bpf_map_update_elem(&webb_revnat, &rk, &od, BPF_ANY);
		__ctx_set(ctx, family, &new_addr, new_port);
	}
	/* sendmsg runs per datagram: report only what is not plain forwarding */
	if (!per_datagram || verdict != WEBB_VERDICT_FORWARDED)
		__emit(cgid, src_identity, &dst_addr, dst_port, &new_addr, new_port,
		       dst ? dst->identity : 0, proto, family, verdict, reason);
	return 1;
}

/* Shows the VIP instead of the backend (getpeername, recvmsg source). */
static __always_inline int __sock_revnat(struct bpf_sock_addr *ctx, int family)
{
	struct revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = (__u16)ctx->user_port,
	};
	struct orig_dst *od;

	__ctx_get(ctx, family, &rk.addr);
	od = bpf_map_lookup_elem(&webb_revnat, &rk);
	if (od)
		__ctx_set(ctx, family, &od->addr, od->port);
	return 1;
}

static __always_inline int __sock_connect(struct bpf_sock_addr *ctx, int family)
{
	if (ctx->protocol == IPPROTO_TCP)
		return __sock_xlate(ctx, family, IPPROTO_TCP, 0);
	if (ctx->protocol == IPPROTO_UDP)
		return __sock_xlate(ctx, family, IPPROTO_UDP, 0);
	return 1;
}

SEC("cgroup/connect4")
int webb_sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock_connect(ctx, 4);
}

SEC("cgroup/connect6")
int webb_sock6_connect(struct bpf_sock_addr *ctx)
{
	return __sock_connect(ctx, 6);
}

SEC("cgroup/sendmsg4")
int webb_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_xlate(ctx, 4, IPPROTO_UDP, 1);
}

SEC("cgroup/sendmsg6")
int webb_sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_xlate(ctx, 6, IPPROTO_UDP, 1);
}

SEC("cgroup/recvmsg4")
int webb_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return __sock_revnat(ctx, 4);
}

SEC("cgroup/recvmsg6")
int webb_sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	return __sock_revnat(ctx, 6);
}

SEC("cgroup/getpeername4")
int webb_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return __sock_revnat(ctx, 4);
}

SEC("cgroup/getpeername6")
int webb_sock6_getpeername(struct bpf_sock_addr *ctx)
{
	return __sock_revnat(ctx, 6);
}

/* ---- same-node acceleration: sockops + SOCKHASH + sk_msg ----
 *
 * Opt-in and guarded: Cilium removed this path in 1.14 after stalls, so the
 * agent turns WEBB_CONFIG_SOCKMAP on only after a stress self-test passed on
 * the running kernel, and off again when its canary stalls. With the flag
 * off, sockops adds nothing and sk_msg passes every message to the normal
 * path, so sockets already in the hash simply stop being accelerated.
 */
static __always_inline int __accel_on(void)
{
	__u32 zero = 0;
	struct webb_config *c = bpf_map_lookup_elem(&webb_config, &zero);

	return c && (c->flags & WEBB_CONFIG_SOCKMAP);
}

static __always_inline void __accel_count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&webb_accel_counts, &what);

	if (n)
		*n += 1;
}

/* The kernel gives local_port in host order and remote_port in network
 * order, placed differently across versions; OR-ing both halves takes the
 * port from wherever it is. */
static __always_inline __u16 __remote_port(__u32 p)
{
	return (__u16)((p >> 16) | (p & 0xffff));
}

static __always_inline void __addr4(struct webb_addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

/* A volatile load: one instruction at the field's own offset, never merged with
 * another branch's load through an offset pointer (which the verifier refuses). */
#define __ctx_u32(p) (*(volatile __u32 *)(p))

/* The client end of a connection connect() sent to the proxy is established:
 * its address and port are known now, so the proxy's SO_ORIGINAL_DST can be. */
static __always_inline void __l7_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *vip = bpf_map_lookup_elem(&webb_l7_pending, &cookie);
	struct peer_key pk = {};

	/* every field read unconditionally: the verifier refuses a ctx pointer
	 * the compiler offsets once and loads through in both branches */
	__u32 family = __ctx_u32(&skops->family), ip4 = __ctx_u32(&skops->local_ip4);
	__u32 port = __ctx_u32(&skops->local_port);
	__u32 a0 = __ctx_u32(&skops->local_ip6[0]), a1 = __ctx_u32(&skops->local_ip6[1]);
	__u32 a2 = __ctx_u32(&skops->local_ip6[2]), a3 = __ctx_u32(&skops->local_ip6[3]);

	if (!vip)
		return;
	if (family == 2 /* AF_INET */) {
		__addr4(&pk.addr, ip4);
	} else {
		pk.addr.w[0] = a0;
		pk.addr.w[1] = a1;
		pk.addr.w[2] = a2;
		pk.addr.w[3] = a3;
	}
	pk.port = bpf_htons((__u16)port);
	bpf_map_update_elem(&webb_origdst, &pk, vip, BPF_ANY);
	bpf_map_delete_elem(&webb_l7_pending, &cookie);
}

SEC("sockops")
int webb_sockops(struct bpf_sock_ops *skops)
{
	struct sock_key k = {};

	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		__l7_established(skops);
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != 2 /* AF_INET */ || !__accel_on())
		return 1;
	__addr4(&k.local, skops->local_ip4);
	__addr4(&k.remote, skops->remote_ip4);
	/* both ends must be pods of this node: anything else leaves the host */
	if (!bpf_map_lookup_elem(&webb_endpoints, &k.local) ||
	    !bpf_map_lookup_elem(&webb_endpoints, &k.remote))
		return 1;
	k.local_port = bpf_htons((__u16)skops->local_port);
	k.remote_port = __remote_port(skops->remote_port);
	if (bpf_sock_hash_update(skops, &webb_sockhash, &k, BPF_NOEXIST) == 0)
		__accel_count(WEBB_ACCEL_SOCKETS);
	return 1;
}

#define WEBB_SO_ORIGINAL_DST 80	/* SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST */
#define WEBB_SOL_IP 0
#define WEBB_SOL_IPV6 41

/* getsockopt(SO_ORIGINAL_DST) on a connection the proxy accepted: the VIP and
 * port the client connected to (webb_origdst, by the proxy's peer). Any other
 * option, or a connection not redirected here, keeps the kernel's answer. */
SEC("cgroup/getsockopt")
int webb_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct peer_key pk = {};
	struct orig_dst *vip;
	void *end = (void *)(long)ctx->optval_end;

	__u32 family, ip4, a0, a1, a2, a3;

	if (ctx->optname != WEBB_SO_ORIGINAL_DST ||
	    (ctx->level != WEBB_SOL_IP && ctx->level != WEBB_SOL_IPV6) || !sk)
		return 1;
	family = __ctx_u32(&sk->family);	/* read unconditionally, as in __l7_established */
	ip4 = __ctx_u32(&sk->dst_ip4);
	a0 = __ctx_u32(&sk->dst_ip6[0]);
	a1 = __ctx_u32(&sk->dst_ip6[1]);
	a2 = __ctx_u32(&sk->dst_ip6[2]);
	a3 = __ctx_u32(&sk->dst_ip6[3]);
	pk.port = (__u16)sk->dst_port;
	if (family == 2 /* AF_INET */) {
		__addr4(&pk.addr, ip4);
	} else {
		pk.addr.w[0] = a0;
		pk.addr.w[1] = a1;
		pk.addr.w[2] = a2;
		pk.addr.w[3] = a3;
	}
	vip = bpf_map_lookup_elem(&webb_origdst, &pk);
	if (!vip)
		return 1;
	if (ctx->level == WEBB_SOL_IP) {
		struct sockaddr_in *sin = (void *)(long)ctx->optval;

		if ((void *)(sin + 1) > end)
			return 1;
		sin->sin_family = 2 /* AF_INET */;
		sin->sin_port = vip->port;
		sin->sin_addr.s_addr = vip->addr.w[3];
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6 *sin6 = (void *)(long)ctx->optval;

		if ((void *)(sin6 + 1) > end)
			return 1;
		sin6->sin6_family = 10 /* AF_INET6 */;
		sin6->sin6_port = vip->port;
		sin6->sin6_flowinfo = 0;
		sin6->sin6_addr.in6_u.u6_addr32[0] = vip->addr.w[0];
		sin6->sin6_addr.in6_u.u6_addr32[1] = vip->addr.w[1];
		sin6->sin6_addr.in6_u.u6_addr32[2] = vip->addr.w[2];
		sin6->sin6_addr.in6_u.u6_addr32[3] = vip->addr.w[3];
		sin6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	/* answered once: a later connection from the same address and port (a
	 * pod that binds it and connects straight to the proxy) finds nothing */
	bpf_map_delete_elem(&webb_origdst, &pk);
	return 1;
}

SEC("sk_msg")
int webb_sk_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};

	if (!__accel_on()) {
		__accel_count(WEBB_ACCEL_PASSED);
		return SK_PASS;
	}
	/* the peer socket sees our remote end as its local one */
	__addr4(&peer.local, msg->remote_ip4);
	__addr4(&peer.remote, msg->local_ip4);
	peer.local_port = __remote_port(msg->remote_port);
	peer.remote_port = bpf_htons((__u16)msg->local_port);
	/* no peer in the hash: the message takes the normal path (SK_PASS
	 * without a redirect), it is never dropped */
	if (bpf_msg_redirect_hash(msg, &webb_sockhash, &peer, BPF_F_INGRESS) == SK_PASS)
		__accel_count(WEBB_ACCEL_REDIRECTED);
	else
		__accel_count(WEBB_ACCEL_PASSED);
	return SK_PASS;
}

/* The pod that receives: by the receiving socket's cgroup (whatever address the
 * packet was sent to: a link-local one too), from the root down like __source;
 * else by the destination address. */
static __always_inline struct endpoint_value *__receiver(struct __sk_buff *skb, const struct webb_addr *dst,
							 __u64 *cgid)
{
	struct endpoint_value *ep;
	__u64 id;
	int level;

	*cgid = bpf_skb_cgroup_id(skb);
	ep = bpf_map_lookup_elem(&webb_cgroups, cgid);
	if (ep)
		return ep;
	for (level = 1; level <= WEBB_MAX_CGROUP_LEVEL; level++) {
		id = bpf_skb_ancestor_cgroup_id(skb, level);
		if (!id || id == *cgid)
			break;
		ep = bpf_map_lookup_elem(&webb_cgroups, &id);
		if (ep) {
			*cgid = id;
			return ep;
		}
	}
	return bpf_map_lookup_elem(&webb_endpoints, dst);
}

/*
 * Every new TCP connection into a pod is judged where it arrives, not only at
 * the sender's connect(): a raw-socket SYN, a link-local or any other address,
 * a sender without Webb's programs all meet the same policy. Only the SYN is
 * judged (established connections, and replies to the pod's own connections,
 * pass). Runs on the listening socket's cgroup (the receiving pod).
 *
 * - MeshTLS STRICT: new connections only from this node (its pods, and the node
 *   address the mTLS tunnel delivers from: both WEBB_EP_LOCAL); a namespace
 *   switched from PERMISSIVE to STRICT keeps every established connection.
 * - A pod selected by an enforcing policy: the source's identity (by address;
 *   unknown: WEBB_IDENTITY_UNKNOWN) must be allowed to the port by a rule
 *   without L7 rules. A port with L7 rules takes connections only from a node
 *   address (the node proxy that applied them, the tunnel, kubelet's probes).
 *   Loopback inside the pod passes.
 */
SEC("cgroup_skb/ingress")
int webb_ingress(struct __sk_buff *skb)
{
	struct webb_addr src = {}, dst = {};
	struct endpoint_value *dep, *sep;
	struct policy_value *v;
	struct tcphdr tcp;
	__u32 l4off;
	__u64 cgid;
	__u8 family;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP ||
		    (ip.frag_off & bpf_htons(0x1fff)))
			return 1;
		__addr4(&src, ip.saddr);
		__addr4(&dst, ip.daddr);
		l4off = (ip.ihl & 0xf) * 4;
		family = 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) || ip6.nexthdr != IPPROTO_TCP)
			return 1;
		__builtin_memcpy(src.w, &ip6.saddr, 16);
		__builtin_memcpy(dst.w, &ip6.daddr, 16);
		l4off = sizeof(ip6);
		family = 6;
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, l4off, &tcp, sizeof(tcp)) || !tcp.syn || tcp.ack)
		return 1;
	dep = __receiver(skb, &dst, &cgid);
	if (!dep || (dep->flags & WEBB_EP_PROXY))
		return 1;
	sep = bpf_map_lookup_elem(&webb_endpoints, &src);
	if (dep->flags & WEBB_EP_MTLS_STRICT) {
		if (!sep || !(sep->flags & WEBB_EP_LOCAL)) {
			__emit_cg(cgid, sep ? sep->identity : WEBB_IDENTITY_UNKNOWN, &src, tcp.source,
				  &dst, tcp.dest, dep->identity, IPPROTO_TCP, family, WEBB_VERDICT_DROPPED,
				  WEBB_REASON_MTLS_STRICT);
			return 0;
		}
	}
	if (!(dep->flags & WEBB_EP_INGRESS_ENFORCED) || (dep->flags & WEBB_EP_AUDIT))
		return 1;	/* audit: the sender's hook reports what would be denied */
	if (skb->ingress_ifindex == 1)
		return 1;	/* loopback: from inside the pod itself */
	if (sep && sep->identity == WEBB_IDENTITY_NODE)
		return 1;
	v = __policy_lookup(sep ? sep->identity : WEBB_IDENTITY_UNKNOWN, dep->identity, bpf_ntohs(tcp.dest),
			    IPPROTO_TCP);
	if (v && !(v->flags & WEBB_POLICY_L7))
		return 1;
	__emit_cg(cgid, sep ? sep->identity : WEBB_IDENTITY_UNKNOWN, &src, tcp.source, &dst, tcp.dest,
		  dep->identity, IPPROTO_TCP, family, WEBB_VERDICT_DROPPED,
		  v ? WEBB_REASON_L7_BYPASS : WEBB_REASON_POLICY_DENIED);
	return 0;
}
