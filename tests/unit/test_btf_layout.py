"""Map layouts: Python's formats match the C structs in the object's BTF, member by member."""

import pytest

from datapath import libbpf
from datapath.loader import OBJECT_PATH
from datapath.maps import BTF_CHECKED, SERVICE_VALUE, Layout, check_btf


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
