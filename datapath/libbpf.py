"""The only ctypes module of Webb: a thin, typed binding to libbpf 1.x.

Every call that fails raises ``OSError`` whose message reads "verb object: cause",
e.g. ``OSError(1, "attach program webb_sock4_connect to /sys/fs/cgroup/x: ...")``.
libbpf 1.x returns NULL or a negative errno and sets ``errno``; both are handled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

_LIBNAMES = ("libbpf.so.1", ctypes.util.find_library("bpf") or "libbpf.so")


def _load() -> ctypes.CDLL:
    last: OSError | None = None
    for name in _LIBNAMES:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError as e:  # pragma: no cover - depends on the host
            last = e
    raise OSError(f"load libbpf: {last} (install Debian package libbpf1)")


_lib = _load()
_vp = ctypes.c_void_p
_RINGBUF_CB = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, ctypes.c_size_t)


def _sig(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("bpf_object__open_file", _vp, ctypes.c_char_p, _vp)
_sig("bpf_object__load", ctypes.c_int, _vp)
_sig("bpf_object__close", None, _vp)
_sig("bpf_object__find_program_by_name", _vp, _vp, ctypes.c_char_p)
_sig("bpf_object__find_map_by_name", _vp, _vp, ctypes.c_char_p)
_sig("bpf_program__attach_cgroup", _vp, _vp, ctypes.c_int)
_sig("bpf_program__fd", ctypes.c_int, _vp)
_sig("bpf_link__destroy", ctypes.c_int, _vp)
_sig("bpf_link__pin", ctypes.c_int, _vp, ctypes.c_char_p)
_sig("bpf_map__fd", ctypes.c_int, _vp)
_sig("bpf_map__key_size", ctypes.c_uint32, _vp)
_sig("bpf_map__value_size", ctypes.c_uint32, _vp)
_sig("bpf_map__type", ctypes.c_int, _vp)
_sig("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _vp, _vp, ctypes.c_uint64)
_sig("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _vp, _vp)
_sig("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _vp)
_sig("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _vp, _vp)
_sig("libbpf_num_possible_cpus", ctypes.c_int)
_sig("bpf_map__set_pin_path", ctypes.c_int, _vp, ctypes.c_char_p)
_sig("bpf_obj_get", ctypes.c_int, ctypes.c_char_p)
_sig("bpf_obj_get_info_by_fd", ctypes.c_int, ctypes.c_int, _vp, ctypes.POINTER(ctypes.c_uint32))
_sig("bpf_link__open", _vp, ctypes.c_char_p)
_sig("bpf_link__update_program", ctypes.c_int, _vp, _vp)
_sig("bpf_link__fd", ctypes.c_int, _vp)
_sig("bpf_object__btf", _vp, _vp)
_sig("btf__type_cnt", ctypes.c_uint32, _vp)
_sig("btf__type_by_id", _vp, _vp, ctypes.c_uint32)
_sig("btf__name_by_offset", ctypes.c_char_p, _vp, ctypes.c_uint32)
_sig("bpf_prog_query", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32),
     ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32))
_sig("bpf_prog_attach", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint)
_sig("libbpf_probe_bpf_prog_type", ctypes.c_int, ctypes.c_int, _vp)
_sig("libbpf_probe_bpf_map_type", ctypes.c_int, ctypes.c_int, _vp)
_sig("ring_buffer__new", _vp, ctypes.c_int, _RINGBUF_CB, _vp, _vp)
_sig("ring_buffer__poll", ctypes.c_int, _vp, ctypes.c_int)
_sig("ring_buffer__free", None, _vp)

BPF_ANY = 0
BPF_SK_MSG_VERDICT = 7  # enum bpf_attach_type
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}


def _fail(what: str, rc: int | None = None) -> OSError:
    err = -rc if rc is not None and rc < 0 else ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def num_possible_cpus() -> int:
    n = int(_lib.libbpf_num_possible_cpus())
    if n <= 0:
        raise _fail("count possible cpus", n)
    return n


def obj_get(path: str) -> int:
    """An fd for a pinned map, program or link."""
    fd = int(_lib.bpf_obj_get(path.encode()))
    if fd < 0:
        raise _fail(f"open pinned object {path}", fd)
    return fd


def obj_info(fd: int, size: int = 96) -> bytes:
    """Raw ``struct bpf_map_info`` / ``bpf_link_info`` of an fd (first ``size`` bytes)."""
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    rc = _lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n))
    if rc < 0:
        raise _fail(f"get info of BPF fd {fd}", rc)
    return buf.raw[: n.value]


def attached_count(cgroup_path: str, attach_type: int) -> int:
    """How many programs are attached to a cgroup for one attach type (BPF_PROG_QUERY)."""
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags, cnt = ctypes.c_uint32(0), ctypes.c_uint32(0)
        rc = _lib.bpf_prog_query(fd, attach_type, 0, ctypes.byref(flags), None, ctypes.byref(cnt))
        if rc < 0:
            raise _fail(f"query programs of {cgroup_path}", rc)
        return int(cnt.value)
    finally:
        os.close(fd)


def probe_prog_type(prog_type: int) -> bool:
    return int(_lib.libbpf_probe_bpf_prog_type(prog_type, None)) == 1


def probe_map_type(map_type: int) -> bool:
    return int(_lib.libbpf_probe_bpf_map_type(map_type, None)) == 1


class Map:
    """A BPF map (of a loaded object, or a pinned one); keys and values are raw bytes."""

    def __init__(self, ptr: int | None, name: str, fd: int | None = None) -> None:
        self.name = name
        self._ptr = ptr
        self._owned_fd = fd
        if ptr is not None:
            self.fd = int(_lib.bpf_map__fd(ptr))
            self.key_size = int(_lib.bpf_map__key_size(ptr))
            self.value_size = int(_lib.bpf_map__value_size(ptr))
            self.percpu = int(_lib.bpf_map__type(ptr)) in _PERCPU_TYPES
        else:
            assert fd is not None
            # struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, ...
            mtype, _id, ksz, vsz = struct.unpack_from("=IIII", obj_info(fd))
            self.fd, self.key_size, self.value_size = fd, ksz, vsz
            self.percpu = mtype in _PERCPU_TYPES

    @classmethod
    def pinned(cls, path: str, name: str) -> Map:
        return cls(None, name, obj_get(path))

    def set_pin_path(self, path: str) -> None:
        """Before load: reuse the map pinned at ``path`` if compatible, else pin there."""
        rc = _lib.bpf_map__set_pin_path(self._ptr, path.encode())
        if rc < 0:
            raise _fail(f"set pin path of map {self.name} to {path}", rc)

    def close(self) -> None:
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = None

    def _value_buf(self) -> ctypes.Array[ctypes.c_char]:
        size = self.value_size
        if self.percpu:
            size = ((size + 7) // 8) * 8 * num_possible_cpus()
        return ctypes.create_string_buffer(size)

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, map wants {self.key_size}")
        return key

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, map wants {self.value_size}")
        rc = _lib.bpf_map_update_elem(self.fd, self._key(key), value, flags)
        if rc < 0:
            raise _fail(f"update map {self.name}", rc)

    def lookup(self, key: bytes) -> bytes | None:
        buf = self._value_buf()
        rc = _lib.bpf_map_lookup_elem(self.fd, self._key(key), buf)
        if rc < 0:
            if -rc == 2 or ctypes.get_errno() == 2:
                return None
            raise _fail(f"look up map {self.name}", rc)
        return buf.raw

    def delete(self, key: bytes) -> bool:
        rc = _lib.bpf_map_delete_elem(self.fd, self._key(key))
        if rc < 0:
            if -rc == 2:
                return False
            raise _fail(f"delete from map {self.name}", rc)
        return True

    def keys(self) -> Iterator[bytes]:
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            rc = _lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if rc < 0:
                if -rc == 2:
                    return
                raise _fail(f"iterate map {self.name}", rc)
            prev = nxt.raw
            yield prev


class Link:
    """An attachment of a program (to a cgroup). ``destroy`` drops this process's
    reference; a pinned link stays attached until its pin is removed too."""

    def __init__(self, ptr: int, what: str) -> None:
        self._ptr: int | None = ptr
        self.what = what

    @classmethod
    def open_pinned(cls, path: str) -> Link:
        ptr = _lib.bpf_link__open(path.encode())
        if not ptr:
            raise _fail(f"open pinned link {path}")
        return cls(ptr, path)

    @property
    def fd(self) -> int:
        return int(_lib.bpf_link__fd(self._ptr))

    def update_program(self, prog: Program) -> None:
        """Atomically replace the attached program: no moment without one."""
        rc = _lib.bpf_link__update_program(self._ptr, prog._ptr)
        if rc < 0:
            raise _fail(f"update link {self.what} to program {prog.name}", rc)

    def pin(self, path: str) -> None:
        rc = _lib.bpf_link__pin(self._ptr, path.encode())
        if rc < 0:
            raise _fail(f"pin link {self.what} at {path}", rc)

    def destroy(self) -> None:
        if self._ptr:
            _lib.bpf_link__destroy(self._ptr)
            self._ptr = None


class Program:
    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    def attach_to_map(self, m: Map, attach_type: int) -> None:
        """Attach to a sockmap/sockhash: the map holds the program from then on."""
        rc = _lib.bpf_prog_attach(_lib.bpf_program__fd(self._ptr), m.fd, attach_type, 0)
        if rc < 0:
            raise _fail(f"attach program {self.name} to map {m.name}", rc)

    def attach_cgroup(self, cgroup_path: str) -> Link:
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ptr = _lib.bpf_program__attach_cgroup(self._ptr, fd)
            if not ptr:
                raise _fail(f"attach program {self.name} to {cgroup_path}")
            return Link(ptr, f"{self.name}@{cgroup_path}")
        finally:
            os.close(fd)


class BpfObject:
    """An ELF BPF object: opened from a file, then loaded into the kernel."""

    def __init__(self, path: str) -> None:
        self.path = path
        ptr = _lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise _fail(f"open BPF object {path}")
        self._ptr: int | None = ptr
        self._loaded = False

    def load(self) -> None:
        rc = _lib.bpf_object__load(self._ptr)
        if rc < 0:
            raise _fail(f"load BPF object {self.path} (the verifier log is on stderr)", rc)
        self._loaded = True

    def program(self, name: str) -> Program:
        ptr = _lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise OSError(2, f"find program {name} in {self.path}: no such program")
        return Program(ptr, name)

    def map(self, name: str) -> Map:
        ptr = _lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise OSError(2, f"find map {name} in {self.path}: no such map")
        return Map(ptr, name)

    def close(self) -> None:
        if self._ptr:
            _lib.bpf_object__close(self._ptr)
            self._ptr = None


BTF_KIND_STRUCT = 4
BTF_KIND_ENUM = 6
BTF_KIND_ENUM64 = 19


def _btf_types(path: str, members: dict[int, str]) -> dict[str, tuple[int, int, int, list[tuple[Any, ...]]]]:
    """The named types of the kinds in ``members`` (kind -> struct format of one member after its
    name_off) in an object file's BTF: name -> (kind, size, kflag, [(member name, *rest), ...]).

    Reads ``struct btf_type`` (name_off, info, size) and the member array that follows it
    (``btf_member``, ``btf_enum``, ``btf_enum64``): UAPI layouts, no kernel needed.
    """
    obj = BpfObject(path)
    try:
        btf = _lib.bpf_object__btf(obj._ptr)
        if not btf:
            raise OSError(2, f"read BTF of {path}: the object has none (compile with -g)")

        def name(off: int) -> str:
            return (_lib.btf__name_by_offset(btf, off) or b"").decode()

        out: dict[str, tuple[int, int, int, list[tuple[Any, ...]]]] = {}
        for type_id in range(1, int(_lib.btf__type_cnt(btf))):
            t = _lib.btf__type_by_id(btf, type_id)
            name_off, info, size = struct.unpack("=III", ctypes.string_at(t, 12))
            kind = (info >> 24) & 0x1F
            if kind not in members or not name(name_off):
                continue
            fmt = "=I" + members[kind]
            raw = ctypes.string_at(t + 12, struct.calcsize(fmt) * (info & 0xFFFF))
            out[name(name_off)] = (kind, size, info >> 31, [(name(m[0]), *m[1:]) for m in struct.iter_unpack(fmt, raw)])
        return out
    finally:
        obj.close()


def btf_structs(path: str) -> dict[str, tuple[int, dict[str, int]]]:
    """Every named struct in an object file's BTF: name -> (size, member name -> byte offset)."""
    out = {}
    for name, (_kind, size, kflag, members) in _btf_types(path, {BTF_KIND_STRUCT: "II"}).items():
        # btf_member: type, offset in bits (with kflag: bitfield size in the top 8 bits)
        out[name] = (size, {m: (off & 0xFFFFFF if kflag else off) // 8 for m, _type, off in members})
    return out


def btf_enums(path: str) -> dict[str, dict[str, int]]:
    """Every named enum in an object file's BTF: name -> member name -> value."""
    out: dict[str, dict[str, int]] = {}
    for name, (_kind, _size, signed, members) in _btf_types(path, {BTF_KIND_ENUM: "I", BTF_KIND_ENUM64: "II"}).items():
        values = out[name] = {}
        for member, *words in members:  # btf_enum: val; btf_enum64: val_lo32, val_hi32
            bits = 32 * len(words)
            v = sum(w << (32 * i) for i, w in enumerate(words))
            values[member] = v - (1 << bits) if signed and v >> (bits - 1) else v  # kflag: signed values
    return out


class RingBuffer:
    """Consumes a BPF_MAP_TYPE_RINGBUF map; ``callback`` gets each record's bytes."""

    def __init__(self, ringbuf: Map, callback: Callable[[bytes], None]) -> None:
        def _cb(_ctx: int | None, data: int, size: int) -> int:
            callback(ctypes.string_at(data, size))
            return 0

        self._cb = _RINGBUF_CB(_cb)  # keep a reference for the C side
        ptr = _lib.ring_buffer__new(ringbuf.fd, self._cb, None, None)
        if not ptr:
            raise _fail(f"open ring buffer {ringbuf.name}")
        self._ptr: int | None = ptr
        self.name = ringbuf.name

    def poll(self, timeout_ms: int) -> int:
        rc = int(_lib.ring_buffer__poll(self._ptr, timeout_ms))
        if rc < 0 and rc != -4:  # EINTR: a signal, not a failure
            raise _fail(f"poll ring buffer {self.name}", rc)
        return max(rc, 0)

    def close(self) -> None:
        if self._ptr:
            _lib.ring_buffer__free(self._ptr)
            self._ptr = None
