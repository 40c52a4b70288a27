"""Sizes as an operator writes them (mirrorfs.common.sizes.parse_size: every size and rate option,
and the benches' --size) and reads them (human_size), case by case."""

import pytest

from mirrorfs.common.sizes import human_size, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text,expected", [
    ("1048576", 1 << 20), ("800k", 800 * K), ("50M", 50 * M), ("1G", G), ("2T", 2 * T),
    ("64MiB", 64 * M), ("64mb", 64 * M), ("1.5G", G + G // 2), ("50M/s", 50 * M), (" 8M ", 8 * M),
    ("1 G", G), ("100B", 100),
    (4096, 4096),
])
def test_a_size_is_read_in_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0M", "-1M", "", "M", "fast", "1X", "1e9", "1M/h"])
def test_anything_else_is_refused(text):
    with pytest.raises(ValueError, match="expected a (positive )?size"):
        parse_size(text)


@pytest.mark.parametrize("n,shown", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (50 * M, "50.0 MiB"),
                                     (3 * T, "3.0 TiB"), (5000 * T, "5000.0 TiB")])
def test_a_size_is_shown_in_the_largest_unit_below_1024(n, shown):
    assert human_size(n) == shown
