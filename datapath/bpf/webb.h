/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Map layouts and constants shared with datapath/maps.py (checked against BTF at load). */
#ifndef WEBB_H
#define WEBB_H

#define WEBB_MAX_SERVICES	65536
#define WEBB_MAX_BACKENDS	262144
#define WEBB_MAX_ENDPOINTS	65536
#define WEBB_MAX_POLICY		262144
#define WEBB_MAX_CGROUP_LEVEL	16	/* deepest cgroup level searched for a pod's ancestor */

/* Constants shared with datapath/maps.py are named enums, never #defines:
 * struct webb_btf_enums puts each one into the object's BTF, where the loader
 * checks every member name and value against Python's before it loads. */
enum webb_identity {
	WEBB_IDENTITY_NODE = 1,		/* a node's own address (its proxy, tunnel, kubelet's probes) */
	WEBB_IDENTITY_UNKNOWN = 2,	/* not a pod of this node (host, world) */
};

enum webb_ep_flag {			/* endpoint_value.flags */
	WEBB_EP_INGRESS_ENFORCED = 1,	/* a policy selects this endpoint */
	WEBB_EP_AUDIT = 2,		/* ...in audit mode only: count, allow */
	WEBB_EP_MTLS_STRICT = 4,	/* MeshTLS STRICT: new TCP only from this node */
	WEBB_EP_LOCAL = 8,		/* a pod of this node, or its tunnel address */
	WEBB_EP_PROXY = 16,		/* the node proxy's own cgroup (the agent and its Envoy in a pod): not rewritten, not judged */
};

enum webb_verdict {			/* flow_event.verdict */
	WEBB_VERDICT_FORWARDED = 1,
	WEBB_VERDICT_DENIED = 2,
	WEBB_VERDICT_DROPPED = 3,
	WEBB_VERDICT_AUDIT = 4,		/* would be denied; allowed (audit mode) */
};

enum webb_reason {			/* flow_event.reason, key of webb_reason_counts */
	WEBB_REASON_DIRECT = 1,		/* not a service: left as is */
	WEBB_REASON_SERVICE = 2,	/* VIP rewritten to a backend */
	WEBB_REASON_L7_PROXY = 3,	/* VIP rewritten to the node Envoy */
	WEBB_REASON_POLICY_DENIED = 4,	/* no L3/L4 rule allows it */
	WEBB_REASON_NO_BACKEND = 5,	/* service has no ready backend */
	WEBB_REASON_BACKEND_MISSING = 6,/* backend slot absent: agent bug */
	WEBB_REASON_POLICY_AUDIT = 7,	/* no rule allows it; audit mode let it pass */
	WEBB_REASON_MTLS_STRICT = 8,	/* plaintext SYN from outside the mesh to a STRICT pod */
	WEBB_REASON_L7_BYPASS = 9,	/* a port with L7 rules, reached other than through the node proxy */
	WEBB_REASON_MAX = 10,
};

/* One address type for both families: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d),
 * so every map serves IPv4 and IPv6 and Python packs addresses one way. */
struct webb_addr {
	__u32 w[4];		/* network order */
};

struct service_key {
	struct webb_addr vip;
	__u16 port;		/* network order */
	__u8 proto;
	__u8 pad;
};

struct service_value {
	__u32 service_id;
	__u32 backend_count;
	struct webb_addr proxy;	/* node Envoy for L7 services (same family as the VIP) */
	__u16 proxy_port;	/* network order; 0 = L4 only */
	__u16 pad;
	__u32 affinity_timeout_s;	/* ClientIP affinity; 0 = none */
};

struct backend_key {
	__u32 service_id;
	__u32 slot;
};

struct backend_value {
	struct webb_addr addr;
	__u16 port;		/* network order */
	__u16 pad;
};

struct endpoint_value {
	__u32 identity;
	__u32 flags;
};

struct policy_key {
	__u32 dst_identity;
	__u32 src_identity;	/* 0 = any source */
	__u16 port;		/* host order; 0 = any port */
	__u8 proto;
	__u8 pad;
};

enum webb_policy_flag {			/* policy_value.flags */
	WEBB_POLICY_L7 = 1,		/* the rule has L7 rules: allowed only through the node proxy */
};

struct policy_value {
	__u32 rule_id;		/* index into the agent's rule table, for reports */
	__u32 flags;
};

struct revnat_key {
	__u64 cookie;		/* socket cookie */
	struct webb_addr addr;	/* rewritten peer */
	__u16 port;		/* network order */
	__u16 pad;
	__u32 pad2;
};

struct affinity_key {
	__u64 netns_cookie;	/* the client pod */
	__u32 service_id;
	__u32 pad;
};

struct affinity_value {
	__u64 last_ns;
	struct webb_addr addr;
	__u16 port;
	__u16 slot;
	__u32 pad;
};

/* A TCP socket between two pods of this node, as seen from that socket. */
struct sock_key {
	struct webb_addr local;
	struct webb_addr remote;
	__u16 local_port;	/* network order */
	__u16 remote_port;	/* network order */
	__u32 pad;
};

enum webb_config_flag {			/* webb_config.flags */
	WEBB_CONFIG_SOCKMAP = 1,	/* same-node acceleration on (self-test passed) */
};

struct webb_config {
	__u32 flags;
};

enum webb_accel_counter {		/* key of webb_accel_counts */
	WEBB_ACCEL_SOCKETS = 0,		/* sockets added to the sockhash */
	WEBB_ACCEL_REDIRECTED = 1,	/* messages redirected to the peer socket */
	WEBB_ACCEL_PASSED = 2,		/* messages left to the normal path */
	WEBB_ACCEL_MAX = 4,
};

struct webb_meta {
	__u8 digest[32];	/* sha256 of the BPF object file */
};

struct orig_dst {
	struct webb_addr addr;
	__u16 port;
	__u16 pad;
};

/* A TCP connection to the node proxy, by its client end (address and port as
 * the proxy sees its peer): the original destination the proxy asks for with
 * getsockopt(SO_ORIGINAL_DST). */
struct peer_key {
	struct webb_addr addr;
	__u16 port;		/* network order */
	__u16 pad;
};

/* Never instantiated: a member of each shared enum's type is what makes clang
 * emit that enum into BTF (see webb_enums_btf in sock.bpf.c). */
struct webb_btf_enums {
	enum webb_identity identity;
	enum webb_ep_flag ep_flag;
	enum webb_verdict verdict;
	enum webb_reason reason;
	enum webb_config_flag config_flag;
	enum webb_accel_counter accel_counter;
	enum webb_policy_flag policy_flag;
};

struct flow_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 src_identity;
	__u32 dst_identity;
	struct webb_addr orig;
	struct webb_addr new;
	__u16 orig_port;
	__u16 new_port;
	__u8 verdict;
	__u8 reason;
	__u8 proto;
	__u8 family;		/* 4 or 6 */
};

#endif
