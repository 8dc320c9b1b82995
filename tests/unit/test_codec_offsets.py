"""Times and datetimes keep their UTC offset exactly, sub-second offsets included (found by
the round-trip property: ``fromisoformat`` drops the sub-second part of an offset)."""

from __future__ import annotations

import datetime as dt

import pytest

from fluxrun._codec import decode, encode

ZONES = [
    dt.timezone(dt.timedelta(microseconds=1)),
    dt.timezone(-dt.timedelta(hours=5, seconds=7, microseconds=250)),
    dt.timezone(dt.timedelta(hours=1)),
    dt.UTC,
    None,
]


@pytest.mark.parametrize("zone", ZONES, ids=repr)
def test_offsets_round_trip(zone: dt.tzinfo | None) -> None:
    for value in (
        dt.time(0, 0, tzinfo=zone),
        dt.time(23, 59, 59, 999999, tzinfo=zone),
        dt.datetime(2020, 1, 1, 12, 30, tzinfo=zone),
    ):
        back = decode(encode({"v": value}))["v"]
        assert back == value and type(back) is type(value)
        assert back.utcoffset() == value.utcoffset()


def test_values_stored_before_keep_reading_the_same() -> None:
    old = '{"v":{"$flux":"datetime","v":"2020-01-01T00:00:00+01:00"}}'
    assert decode(old)["v"] == dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
