"""Key spellings: no two source keys may become one path, and keys come back as spelled."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
from conftest import assert_same_arrays
from hypothesis import given
from hypothesis import strategies as st

import bridge
from bridge.tree import index_of, parse_dotted, parse_dotted_keys

ODD_KEYS = ["h.01.w", "h.1.w", "h.007.w", "h.0.w", "l.²", "x.٣.w", "y.10.w"]


@pytest.mark.parametrize(
    ("part", "index"),
    [
        *[("0", 0), ("12", 12), ("01", None), ("007", None), ("٣", None), ("²", None)],
        *[("", None), ("-1", None), ("1a", None), (3, 3), (True, None)],
    ],
)
def test_only_ascii_digits_without_a_leading_zero_are_positions(part, index):
    assert index_of(part) == index


def test_parse_dotted_keeps_names_that_only_look_like_numbers():
    assert parse_dotted("h.01.w") == ("h", "01", "w")
    assert parse_dotted("h.1.w") == ("h", 1, "w")
    assert parse_dotted("l.²") == ("l", "²")


def test_many_keys_parse_at_once_as_each_alone():
    keys = ["h.01.w", "h.1.w", "h.1.01", "l.²", "0", ""]
    expected = [("h", "01", "w"), ("h", 1, "w"), ("h", 1, "01"), ("l", "²"), (0,), ("",)]
    assert parse_dotted_keys(keys) == expected


@given(st.lists(st.text(alphabet="ab0129٣².", max_size=8), max_size=20))
def test_parsing_many_keys_at_once_is_parsing_each(keys):
    assert parse_dotted_keys(keys) == [parse_dotted(key) for key in keys]


def test_a_safetensors_file_with_look_alike_keys_keeps_every_tensor(tmp_path):
    arrays = {key: np.full((2,), i, np.float32) for i, key in enumerate(ODD_KEYS)}
    file = tmp_path / "odd.safetensors"
    safetensors.numpy.save_file(arrays, str(file))
    state = bridge.convert(file, to="torch")
    assert sorted(state) == sorted(ODD_KEYS)
    for key, array in arrays.items():
        assert_same_arrays(state[key].numpy(), array)
    assert sorted(row.target for row in bridge.inspect(file).rows) == sorted(ODD_KEYS)


def test_look_alike_keys_are_written_as_spelled(tmp_path):
    arrays = {key: np.full((2,), i, np.float32) for i, key in enumerate(ODD_KEYS)}
    bridge.save(arrays, tmp_path / "out.safetensors", format="safetensors", source="torch")
    back = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    assert sorted(back) == sorted(ODD_KEYS)
    for key, array in arrays.items():
        assert_same_arrays(back[key], array)


def test_nnx_refuses_a_position_and_a_name_under_one_node_naming_both():
    arrays = {"h.01.w": np.zeros(2, np.float32), "h.1.w": np.ones(2, np.float32)}
    with pytest.raises(
        bridge.FormatError, match=r"'h\.01\.w' and 'h\.1\.w'|'h\.1\.w' and 'h\.01\.w'"
    ):
        bridge.convert(arrays, to="nnx_state", source="torch")
