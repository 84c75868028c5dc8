"""The value types of settings (mlops/setting_types.py): each spelling accepted or refused.

Each type is validated through pydantic as ``mlops.config`` does
(``TypeAdapter``); a refusal is pydantic's one error, whose message is the
parser's ``must be ..., got '...'`` behind pydantic's ``Value error, ``.
"""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from mlops.setting_types import Bytes, Flag, Number, Whole, WholeSeconds

MIB = 1 << 20


def parsed(kind, value):
    return TypeAdapter(kind).validate_python(value)


def refusal(kind, value) -> str:
    """The one error message pydantic gives for ``value``."""
    with pytest.raises(ValidationError) as refused:
        parsed(kind, value)
    (error,) = refused.value.errors()
    return error["msg"]


@pytest.mark.parametrize(("value", "expected"), [
    ("12", 12), (" 12 ", 12), ("1_000", 1000), ("+5", 5), ("-3", -3), ("0", 0),
    (12, 12), (12.0, 12),  # values given as numbers go to pydantic's int
])
def test_whole_accepts(value, expected):
    result = parsed(Whole, value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value", ["2.5", "", " ", "x", "1e3", "12s", "1,000", "0x10"])
def test_whole_refuses_naming_the_value(value):
    assert refusal(Whole, value) == f"Value error, must be a whole number, got {value!r}"


def test_whole_leaves_a_fractional_number_to_pydantic():
    assert refusal(Whole, 12.5) == \
        "Input should be a valid integer, got a number with a fractional part"


@pytest.mark.parametrize(("value", "expected"), [("30", 30.0), (" 7 ", 7.0), (30, 30.0)])
def test_whole_seconds_are_whole_and_held_as_a_float(value, expected):
    result = parsed(WholeSeconds, value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", ["1.5", "30s", ""])
def test_whole_seconds_refuse_a_fraction_or_a_unit(value):
    assert refusal(WholeSeconds, value) == f"Value error, must be a whole number, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [
    ("0.5", 0.5), ("2", 2.0), ("1e3", 1000.0), (" 3 ", 3.0), ("-1.25", -1.25), (2, 2.0),
])
def test_number_accepts(value, expected):
    result = parsed(Number, value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", ["", "x", "1,5", "2s", "½"])
def test_number_refuses_naming_the_value(value):
    assert refusal(Number, value) == f"Value error, must be a number, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True),
    ("0", False), ("false", False), ("False", False), ("NO", False),
    (True, True), (False, False), (1, True), (0, False),
    (" true", True), ("no\n", False),  # trimmed, as whole numbers and numbers are
])
def test_flag_accepts(value, expected):
    assert parsed(Flag, value) is expected


@pytest.mark.parametrize("value", ["", "on", "off", "y", "n", "2", " ", "t rue"])
def test_flag_refuses_naming_the_value(value):
    assert refusal(Flag, value) == f"Value error, must be true or false, got {value!r}"


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("500MB", 500_000_000), ("0.5GB", 500_000_000),  # powers of 1000
    ("512MiB", 536_870_912), ("1.5MiB", 1_572_864), ("1 GiB", 1 << 30),  # powers of 1024
    ("1048576", MIB), ("1MiB", MIB), (MIB, MIB), ("2mb", 2_000_000),
])
def test_bytes_accepts(value, expected):
    assert parsed(Bytes, value) == expected


@pytest.mark.parametrize("value", ["lots", "", "-5MB", "5 parsecs", "MB"])
def test_bytes_refuses_what_is_not_a_size(value):
    assert refusal(Bytes, value) == (
        f"Value error, must be a size such as 0.5GB, 512MiB or 500000000 (bytes), got {value!r}")


@pytest.mark.parametrize("value", ["1048575", "1MB", "1mb", "0", MIB - 1])
def test_bytes_refuses_less_than_one_mib(value):
    assert refusal(Bytes, value) == f"Value error, must be at least 1MiB, got {value!r}"
