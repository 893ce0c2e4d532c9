"""Map layouts and shared constants: Python's formats match the C structs in the object's BTF,
member by member, and Python's flags, verdicts and reasons match the C enums there."""

import enum
from pathlib import Path

import pytest

from datapath import libbpf, loader, maps
from datapath.loader import OBJECT_PATH
from datapath.maps import BTF_CHECKED, SERVICE_VALUE, Layout, check_btf, check_enums, shared_enums


def test_every_shared_struct_matches_btf() -> None:
    structs = libbpf.btf_structs(str(OBJECT_PATH))  # open only: no root, no kernel
    check_btf(structs)
    assert {lay.c_name for lay in BTF_CHECKED} <= set(structs)


def test_a_moved_member_is_refused_with_the_struct_named(monkeypatch: pytest.MonkeyPatch) -> None:
    structs = libbpf.btf_structs(str(OBJECT_PATH))
    size, members = structs["service_value"]
    structs["service_value"] = (size, {**members, "proxy_port": members["proxy_port"] + 2})
    with pytest.raises(RuntimeError, match="check layout service_value: C has size 32"):
        check_btf(structs)


def test_layout_offsets_follow_the_format() -> None:
    lay = Layout("x", ("a", "I"), ("b", "16s"), ("c", "2s"), ("pad", "2x"))
    assert lay.offsets() == {"a": 0, "b": 4, "c": 20, "pad": 22} and lay.size == 24
    assert SERVICE_VALUE.offsets()["affinity_timeout_s"] == 28


def test_every_shared_enum_matches_btf() -> None:
    enums = libbpf.btf_enums(str(OBJECT_PATH))  # open only: no root, no kernel
    check_enums(enums)
    assert set(shared_enums()) <= set(enums)
    assert enums["webb_reason"]["WEBB_REASON_MTLS_STRICT"] == maps.Reason.MTLS_STRICT == 8
    assert enums["webb_ep_flag"]["WEBB_EP_LOCAL"] == maps.EP_LOCAL == 8


def test_a_changed_python_value_is_refused_with_the_enum_and_member_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maps, "EP_LOCAL", 16)
    with pytest.raises(RuntimeError, match="check enum webb_ep_flag: WEBB_EP_LOCAL is 8 in C, 16 in datapath/maps.py"):
        check_enums(libbpf.btf_enums(str(OBJECT_PATH)))


def test_a_member_on_one_side_only_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    enums = libbpf.btf_enums(str(OBJECT_PATH))
    reasons = {r.name: r.value for r in maps.Reason}
    monkeypatch.setattr(maps, "Reason", enum.IntEnum("Reason", {**reasons, "QUIC": 99}))  # added in Python only
    with pytest.raises(RuntimeError, match="check enum webb_reason: WEBB_REASON_QUIC is missing in C, 99 in datapath/maps.py"):
        check_enums(enums)
    monkeypatch.setattr(maps, "Reason", enum.IntEnum("Reason", reasons))
    check_enums(enums)
    enums["webb_verdict"]["WEBB_VERDICT_REDIRECTED"] = 5  # added in C only
    with pytest.raises(RuntimeError, match="check enum webb_verdict: WEBB_VERDICT_REDIRECTED is 5 in C, missing in datapath/maps.py"):
        check_enums(enums)
    del enums["webb_verdict"]
    with pytest.raises(RuntimeError, match="check enum webb_verdict: not in the BPF object's BTF"):
        check_enums(enums)


def test_the_loader_refuses_a_mismatch_before_loading_or_adopting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loader, "ensure_bpffs", lambda: None)  # no bpffs, no root: nothing may be touched
    monkeypatch.setattr(maps, "ACCEL_COUNTERS", ("sockets", "passed", "redirected"))
    with pytest.raises(RuntimeError, match="check enum webb_accel_counter: WEBB_ACCEL_REDIRECTED is 1 in C, 2 in datapath/maps.py; "
                                           "WEBB_ACCEL_PASSED is 2 in C, 1 in datapath/maps.py"):
        loader.Datapath(str(tmp_path / "no-cgroup"), tmp_path / "pins")
    assert not (tmp_path / "pins").exists()


def test_a_changed_or_unrecorded_object_is_refused(tmp_path: Path) -> None:
    """The loader verifies the object's sha256 against the one ``make bpf`` recorded (issue 13)."""
    import hashlib

    from datapath.loader import verify_object

    data = OBJECT_PATH.read_bytes()
    verify_object(OBJECT_PATH, data)  # the object built by make bpf
    obj = tmp_path / "sock.bpf.o"
    obj.write_bytes(data + b"\0")
    with pytest.raises(RuntimeError, match="missing or empty"):
        verify_object(obj, obj.read_bytes())
    obj.with_name("sock.bpf.o.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    with pytest.raises(RuntimeError, match="was changed after it was built; refusing to load it"):
        verify_object(obj, obj.read_bytes())
