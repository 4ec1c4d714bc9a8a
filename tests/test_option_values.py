"""keyfence.option_values: the one size parser of mount options and the worker."""

from __future__ import annotations

import pytest

from keyfence.option_values import (
    MAX_WRITE_THROUGH,
    count_in,
    parse_dirty_limit,
    parse_seconds,
    parse_size,
    parse_write_through,
)


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


def test_a_dirty_limit_holds_at_least_one_page() -> None:
    # before: 1 to 4095 bytes passed the daemon's check and the worker it
    # started died of "ValueError: dirty limit below one page" (EIO)
    assert parse_dirty_limit("4K") == 4096
    for text in ("1", "100", "4095", "1.5K"):
        with pytest.raises(ValueError, match="below one page"):
            parse_dirty_limit(text)
    with pytest.raises(ValueError, match="not a positive size"):
        parse_dirty_limit("0")


def test_write_through_is_zero_or_at_most_one_write() -> None:
    assert parse_write_through("0") == 0
    assert parse_write_through("64K") == 64 << 10
    assert parse_write_through("1M") == MAX_WRITE_THROUGH
    with pytest.raises(ValueError, match="at most 1M"):
        parse_write_through("2M")
    with pytest.raises(ValueError, match="not a size"):
        parse_write_through("1e999")


@pytest.mark.parametrize("text", ["0", "10", "0.5", "31536000"])
def test_seconds_from_zero_to_a_year(text: str) -> None:
    assert parse_seconds(text) == float(text)


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "-inf", "31536001", "1e999"])
def test_seconds_out_of_range(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_seconds(text)


def test_seconds_not_a_number() -> None:
    with pytest.raises(ValueError, match="not a number of seconds: 'soon'"):
        parse_seconds("soon")


def test_counts_in_a_range() -> None:
    tasks = count_in(1, 1024)
    assert tasks("64") == 64
    with pytest.raises(ValueError, match=r"out of range \(1 to 1024\): '0'"):
        tasks("0")
    with pytest.raises(ValueError, match=r"not a whole number: '1\.5'"):
        tasks("1.5")
    with pytest.raises(ValueError, match="not a number of microseconds: 'x'"):
        count_in(0, 1000, "number of microseconds")("x")
