"""keyfence.sizes: the one size parser of mount options and the worker."""

from __future__ import annotations

import pytest

from keyfence.sizes import MAX_WRITE_THROUGH, parse_size, parse_write_through


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("65536", 65536),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64KB", 64 << 10),
        (" 256M ", 256 << 20),
        ("1G", 1 << 30),
        ("1.5M", 3 << 19),
    ],
)
def test_sizes_people_write(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "x", "64X", "nan", "inf", "1e999", "-inf", "1e999G"])
def test_not_a_size_is_a_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="not a size") as raised:
        parse_size(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize("text", ["0", "-5", "0K", "0.0001"])
def test_a_size_must_be_positive(text: str) -> None:
    with pytest.raises(ValueError, match="not a positive size"):
        parse_size(text)


def test_write_through_is_zero_or_at_most_one_write() -> None:
    assert parse_write_through("0") == 0
    assert parse_write_through("64K") == 64 << 10
    assert parse_write_through("1M") == MAX_WRITE_THROUGH
    with pytest.raises(ValueError, match="at most 1M"):
        parse_write_through("2M")
    with pytest.raises(ValueError, match="not a size"):
        parse_write_through("1e999")
