"""I5 canonical hashing and the checkpoint codec, as pure functions (no database).

The step-level view of the same rules (recorded input hashes, errors naming the step) is in
test_replay_contract.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from child_support import Box, Color, Point
from pydantic import BaseModel

from tidebase_agents import CheckpointSerializationError
from tidebase_agents._codec import decode, encode
from tidebase_agents._hashing import canonical, canonical_json, dumps, sha256_hex


def sdk_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


PLAIN_JSON = [
    None,
    True,
    0,
    -17,
    2**63,
    1.5,
    -0.25,
    "",
    "plain",
    "ünïcödé 日本 \u2028 emoji 🎉",
    [],
    {},
    [1, "a", None, [2.5, {"k": False}]],
    {"b": 1, "a": {"z": [3, 2, 1], "y": "é"}, "": None},
]


@pytest.mark.parametrize("value", PLAIN_JSON, ids=repr)
def test_i5_plain_json_hash_equals_the_sdk_hash(value: Any) -> None:
    """I5: for plain JSON, the hash is SHA-256 over json.dumps(sort_keys, compact separators,
    ensure_ascii=False) encoded as UTF-8 (what the Tidebase SDKs compute)."""
    assert sha256_hex(value) == sdk_hash(value)
    assert canonical(value) == value


class _Level(enum.IntEnum):
    LOW = 1


class _Tag(str, enum.Enum):
    A = "a"


_LEAVES = [None, True, False, 0, -3, 2**70, 1.5, -0.0, 1e300, "", "é\u2028🎉", _Level.LOW]
_LEAVES += [_Tag.A, Color.RED, dt.date(2024, 1, 2), b"\x00"]


def _random_value(rng: random.Random, depth: int) -> Any:
    """Plain JSON mostly, with now and then a value that takes a canonical form first."""
    pick = rng.random()
    if depth > 3 or pick < 0.35:
        return rng.choice(_LEAVES)
    size = rng.randrange(4)
    if pick < 0.65:
        return {f"k{rng.randrange(9)}": _random_value(rng, depth + 1) for _ in range(size)}
    items = [_random_value(rng, depth + 1) for _ in range(size)]
    return tuple(items) if pick < 0.7 else items


def test_i5_canonical_text_of_plain_and_typed_values_is_the_full_walks() -> None:
    """I5: the shortcut for values that are plain JSON already yields exactly the text of
    the full canonical walk, whatever mix of plain and typed values it is given."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    for _ in range(2000):
        value = _random_value(rng, 0)
        assert canonical_json(value) == dumps(canonical(value)), (seed, value)


def test_i5_hash_ignores_dict_order_and_set_order() -> None:
    assert sha256_hex({"a": 1, "b": 2}) == sha256_hex({"b": 2, "a": 1})
    assert sha256_hex({3, 1, 2}) == sha256_hex({2, 3, 1}) == sdk_hash([1, 2, 3])
    assert sha256_hex(frozenset({"b", "a"})) == sdk_hash(["a", "b"])
    assert sha256_hex({"a": 1}) != sha256_hex({"a": 2})


class Level(enum.IntEnum):
    LOW = 1


class Mode(enum.Enum):
    FAST = "fast"


@dataclasses.dataclass
class Inner:
    when: dt.date
    raw: bytes


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    tags: set[str]


class Doc(BaseModel):
    title: str
    at: dt.datetime
    mode: Mode
    items: list[int] = []


@pytest.mark.parametrize(
    ("value", "form"),
    [
        (Point(x=1, y=2), {"x": 1, "y": 2, "tags": []}),
        (
            Doc(
                title="t",
                at=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                mode=Mode.FAST,
            ),
            {"title": "t", "at": "2024-01-02T03:04:05Z", "mode": "fast", "items": []},
        ),
        (
            Outer("o", Inner(dt.date(2024, 1, 2), b"\x00\xff"), {"b", "a"}),
            {"name": "o", "inner": {"when": "2024-01-02", "raw": "AP8="}, "tags": ["a", "b"]},
        ),
        (Color.RED, "red"),
        (Level.LOW, 1),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 6), "2024-01-02T03:04:05.000006"),
        (
            dt.datetime(2024, 1, 2, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            "2024-01-02T03:04:00-05:00",
        ),
        (dt.date(2024, 2, 29), "2024-02-29"),
        (b"hello", "aGVsbG8="),
        (bytearray(b"\x01"), "AQ=="),
        # Set elements are ordered by their canonical JSON text (defined for mixed types too).
        ({2, 10, 1}, [1, 10, 2]),
        ({"b", 1, None}, ["b", 1, None]),
        ({"b", "a"}, ["a", "b"]),
        ((1, (2, "x")), [1, [2, "x"]]),
        (
            {"nested": [Point(x=0, y=0), {Color.BLUE}]},
            {"nested": [{"x": 0, "y": 0, "tags": []}, ["blue"]]},
        ),
        (decimal.Decimal("1.10"), "1.10"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_i5_canonical_forms(value: Any, form: Any) -> None:
    """I5: pydantic models dump in JSON mode, dataclasses as field dicts, enums as their value,
    datetimes as ISO 8601, bytes as base64, sets as sorted lists, tuples as lists; the hash is
    the SDK hash of that form."""
    assert canonical(value) == form
    assert sha256_hex(value) == sdk_hash(form)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": {"b": [1, 2, object()]}}, "$.a.b[2]"),
        ([{"x": lambda: 1}], "$[0].x"),
        (Outer("o", Inner(dt.date(2024, 1, 1), object()), set()), "$.inner.raw"),  # type: ignore[arg-type]
        ({"k": {1: "int key"}}, "$.k"),
        ({"f": float("nan")}, "$.f"),
        ({"f": [float("inf")]}, "$.f[0]"),
    ],
    ids=["object", "lambda", "dataclass-field", "int-key", "nan", "inf"],
)
def test_i5_unsupported_values_name_what_and_where(value: Any, path: str) -> None:
    """I5: a value with no canonical form fails naming the thing hashed and the path."""
    with pytest.raises(CheckpointSerializationError) as info:
        sha256_hex(value, what="input of step 'fetch'")
    message = str(info.value)
    assert "input of step 'fetch'" in message
    assert f" {path}" in message, message


CODEC_VALUES = [
    None,
    True,
    7,
    2.5,
    float("inf"),
    "s",
    [1, [2]],
    {"a": {"b": None}},
    {"$t": "looks like a tag", "v": 1},
    (1, (2, 3)),
    {1, 2},
    frozenset({"a"}),
    b"\x00\xff",
    dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.datetime(2024, 1, 2, 3, 4, 5),
    dt.date(2024, 1, 2),
    dt.time(3, 4, 5),
    dt.timedelta(days=1, seconds=2),
    decimal.Decimal("1.10"),
    uuid.UUID(int=7),
    Color.BLUE,
    Point(x=1, y=2, tags=["a"]),
    Box("b", (1, 2), dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)),
    {"deep": [Point(x=3, y=4), (Color.RED, {b"k"})]},
]


@pytest.mark.parametrize("value", CODEC_VALUES, ids=lambda v: type(v).__name__)
def test_codec_round_trips_values_with_their_types(value: Any) -> None:
    """R1: a checkpoint is plain JSON and decodes to an equal value of the same type."""
    data = encode(value)
    assert json.loads(json.dumps(data)) == data
    back = decode(json.loads(json.dumps(data)))
    assert back == value
    assert type(back) is type(value)


def test_codec_keeps_nested_types() -> None:
    back = decode(json.loads(json.dumps(encode(CODEC_VALUES[-1]))))
    assert type(back["deep"][0]) is Point
    assert type(back["deep"][1]) is tuple
    assert type(back["deep"][1][0]) is Color
    assert type(back["deep"][1][1]) is set
    box = decode(encode(CODEC_VALUES[-2]))
    assert type(box.sizes) is tuple
    assert box.when.tzinfo is not None


def test_codec_rejects_unsupported_values_with_the_path() -> None:
    with pytest.raises(CheckpointSerializationError, match=r"\$\.a\.b\[2\]"):
        encode({"a": {"b": [1, 2, object()]}})
    with pytest.raises(CheckpointSerializationError, match=r"\$\.k"):
        encode({"k": {1: "int key"}})


def test_codec_never_imports_code_named_by_a_checkpoint() -> None:
    """Decoding resolves classes only among registered checkpoint types; it never imports."""
    import sys

    name = "tidebase_test_never_imported_module"
    data = {"$t": "pydantic", "cls": f"{name}:Evil", "v": {}}
    with pytest.raises(CheckpointSerializationError, match="not a registered checkpoint type"):
        decode(data)
    assert name not in sys.modules
    with pytest.raises(CheckpointSerializationError):
        decode({"$t": "pydantic", "cls": "child_support:DoesNotExist", "v": {}})
    with pytest.raises(CheckpointSerializationError):
        decode({"$t": "no-such-tag", "v": 1})


@pytest.mark.parametrize("tag", ["enum", "dataclass", "pydantic"])
@pytest.mark.parametrize(
    "cls", ["subprocess:Popen", "os:system", "builtins:eval", "pathlib:Path", "child_support:Box"]
)
def test_a_checkpoint_naming_an_unregistered_class_constructs_nothing(
    tag: str, cls: str, tmp_path: Path
) -> None:
    """R14: whatever construct names a class the process did not register, nothing is built."""
    import child_support  # noqa: F401  (a registered module: only its registered types count)

    marker = tmp_path / "pwned"
    value: Any = ["touch", str(marker)]
    if tag != "enum":
        value = {"args": ["touch", str(marker)]}
    if cls == "child_support:Box" and tag == "dataclass":
        return  # registered: constructing it is the point of registering
    with pytest.raises(CheckpointSerializationError):
        decode({"$t": tag, "cls": cls, "v": value})
    assert not marker.exists()
    with pytest.raises(CheckpointSerializationError):
        decode({"$t": tag, "cls": cls.replace(":", ".")})


def test_encoding_an_unregistered_class_fails_at_once_naming_the_fix() -> None:
    @dataclasses.dataclass
    class Unregistered:
        x: int

    with pytest.raises(CheckpointSerializationError, match="register_types"):
        encode(Unregistered(1), what="output of step 's'")


@pytest.mark.parametrize(
    "make",
    [
        lambda: _nested(10_000),
        lambda: _self_containing(),
    ],
    ids=["deep", "cycle"],
)
def test_deep_and_self_containing_values_fail_with_the_librarys_error(make: Any) -> None:
    value = make()
    with pytest.raises(CheckpointSerializationError):
        encode(value)
    with pytest.raises(CheckpointSerializationError):
        sha256_hex(value)
    with pytest.raises(CheckpointSerializationError):
        canonical(value)


def test_deep_checkpoint_data_fails_decoding_with_the_librarys_error() -> None:
    with pytest.raises(CheckpointSerializationError, match="deeper"):
        decode(_nested(10_000))


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _self_containing() -> Any:
    value: dict[str, Any] = {}
    value["me"] = value
    return value
