// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Webb socket-level datapath: service load balancing and L3/L4 policy at
 * connect() time, before a single packet exists.
 *
 * Only UAPI headers are used (struct bpf_sock_addr is stable ABI), so the
 * object needs no vmlinux.h and no CO-RE relocation to load on any kernel
 * with cgroup sock_addr hooks (>= 4.17) and ring buffers (>= 5.8).
 *
 * Map layouts are mirrored in datapath/maps.py; the loader checks every key
 * and value size against this object's BTF before it writes an entry.
 */
#include <linux/bpf.h>
#include <linux/in.h>
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
	__type(key, __u32);			/* pod IPv4, network order */
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

/* Original destination per socket, so getpeername() shows the VIP. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);			/* socket cookie */
	__type(value, struct orig_dst);
} webb_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEBB_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} webb_reason_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} webb_events SEC(".maps");

static __always_inline void __count(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&webb_reason_counts, &reason);

	if (n)
		*n += 1;
}

static __always_inline void __emit(struct bpf_sock_addr *ctx, __u32 src_identity,
				   __u32 orig_ip, __u16 orig_port,
				   __u32 new_ip, __u16 new_port,
				   __u32 dst_identity, __u8 verdict, __u8 reason)
{
	struct flow_event *e;

	__count(reason);
	/* A full ring buffer loses the event, never the connection; the loss
	 * is visible as the gap between reason counts and received events. */
	e = bpf_ringbuf_reserve(&webb_events, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->src_identity = src_identity;
	e->dst_identity = dst_identity;
	e->orig_ip = orig_ip;
	e->new_ip = new_ip;
	e->orig_port = orig_port;
	e->new_port = new_port;
	e->verdict = verdict;
	e->reason = reason;
	e->proto = IPPROTO_TCP;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

/* Returns 1 if the endpoint at dst_ip accepts src_identity on port. */
static __always_inline int __policy_allows(__u32 src_identity,
					   const struct endpoint_value *dst,
					   __u16 port_host)
{
	struct policy_key k = {
		.dst_identity = dst->identity,
		.src_identity = src_identity,
		.port = port_host,
		.proto = IPPROTO_TCP,
	};

	if (!(dst->flags & WEBB_EP_INGRESS_ENFORCED))
		return 1;
	if (bpf_map_lookup_elem(&webb_policy, &k))
		return 1;
	k.port = 0;			/* rule without toPorts: any port */
	if (bpf_map_lookup_elem(&webb_policy, &k))
		return 1;
	k.src_identity = 0;		/* rule from any endpoint */
	return bpf_map_lookup_elem(&webb_policy, &k) != NULL;
}

static __always_inline int __sock4_connect(struct bpf_sock_addr *ctx)
{
	__u32 dst_ip = ctx->user_ip4;
	__u16 dst_port = (__u16)ctx->user_port;	/* network order in low 16 bits */
	__u64 cgid = bpf_get_current_cgroup_id();
	struct endpoint_value *src, *dst;
	struct service_value *svc;
	struct backend_value *be;
	struct service_key sk = {};
	struct backend_key bk = {};
	__u32 src_identity = WEBB_IDENTITY_UNKNOWN;
	__u32 new_ip = dst_ip;
	__u16 new_port = dst_port;
	__u8 verdict = WEBB_VERDICT_FORWARDED;
	__u8 reason = WEBB_REASON_DIRECT;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	src = bpf_map_lookup_elem(&webb_cgroups, &cgid);
	if (src)
		src_identity = src->identity;

	sk.vip = dst_ip;
	sk.port = dst_port;
	sk.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&webb_services, &sk);
	if (svc) {
		if (svc->backend_count == 0) {
			__emit(ctx, src_identity, dst_ip, dst_port, 0, 0, 0,
			       WEBB_VERDICT_DROPPED, WEBB_REASON_NO_BACKEND);
			return 0;
		}
		bk.service_id = svc->service_id;
		bk.slot = bpf_get_prandom_u32() % svc->backend_count;
		be = bpf_map_lookup_elem(&webb_backends, &bk);
		if (!be) {
			/* The agent writes backends before the service entry,
			 * so a hole here means a bug in the agent: drop loudly. */
			__emit(ctx, src_identity, dst_ip, dst_port, 0, 0, 0,
			       WEBB_VERDICT_DROPPED, WEBB_REASON_BACKEND_MISSING);
			return 0;
		}
		new_ip = be->ip;
		new_port = be->port;
		reason = WEBB_REASON_SERVICE;
	}

	dst = bpf_map_lookup_elem(&webb_endpoints, &new_ip);
	if (dst && !__policy_allows(src_identity, dst, bpf_ntohs(new_port))) {
		__emit(ctx, src_identity, dst_ip, dst_port, new_ip, new_port,
		       dst->identity, WEBB_VERDICT_DENIED, WEBB_REASON_POLICY_DENIED);
		return 0;
	}

	if (svc && svc->proxy_port) {
		new_ip = svc->proxy_ip;
		new_port = svc->proxy_port;
		reason = WEBB_REASON_L7_PROXY;
	}
	if (svc) {
		struct orig_dst od = { .ip = dst_ip, .port = dst_port };
		__u64 cookie = bpf_get_socket_cookie(ctx);

		bpf_map_update_elem(&webb_revnat, &cookie, &od, BPF_ANY);
		ctx->user_ip4 = new_ip;
		ctx->user_port = new_port;
	}
	__emit(ctx, src_identity, dst_ip, dst_port, new_ip, new_port,
	       dst ? dst->identity : 0, verdict, reason);
	return 1;
}

static __always_inline int __sock4_getpeername(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *od = bpf_map_lookup_elem(&webb_revnat, &cookie);

	if (od) {
		ctx->user_ip4 = od->ip;
		ctx->user_port = od->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int webb_sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock4_connect(ctx);
}

SEC("cgroup/getpeername4")
int webb_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return __sock4_getpeername(ctx);
}
