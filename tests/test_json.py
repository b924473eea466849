"""Bounded JSON (chiplock/_json.py): caps, refused literals, and the string-aware depth scan."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from chiplock import _json
from chiplock._json import JSONLimitError, Limits, check_tree, loads, scan, size_problem

LIMITS = Limits(max_bytes=1 << 20, max_depth=8, max_containers=100, max_items=200)


def _reference_depth(data: bytes) -> int:
    """Byte-at-a-time definition of what :func:`scan` computes (a backslash escapes the next byte)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in data:
        if escaped:
            escaped = False
            if in_string or c == ord('"'):
                continue
        elif c == ord("\\"):
            escaped = True
            continue
        if in_string:
            in_string = c != ord('"')
        elif c == ord('"'):
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


json_values = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab"\\[]{}\u00e9\U0001f600', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='"\\[]{ab', max_size=4), inner,
                                                                max_size=3),
    max_leaves=20)


@settings(max_examples=300, derandomize=True, database=None)
@given(value=json_values, chunk=st.integers(1, 64))
def test_scan_matches_the_json_nesting_depth(value, chunk, monkeypatch_chunk):
    data = json.dumps(value, ensure_ascii=False).encode()
    monkeypatch_chunk(chunk)  # tiny chunks exercise the state carried from chunk to chunk
    assert scan(data, 10**6) == _reference_depth(data)


@settings(max_examples=300, derandomize=True, database=None)
@given(data=st.lists(st.sampled_from(list(b'"\\[]{}a')), max_size=60).map(bytes), chunk=st.integers(1, 16))
def test_scan_matches_the_reference_on_any_bytes(data, chunk, monkeypatch_chunk):
    monkeypatch_chunk(chunk)
    assert scan(data, 10**6) == _reference_depth(data)


@pytest.fixture(scope="module")
def monkeypatch_chunk():
    old = _json._SCAN_CHUNK

    def set_chunk(n: int) -> None:
        _json._SCAN_CHUNK = n

    yield set_chunk
    _json._SCAN_CHUNK = old


def test_depth_ignores_brackets_in_strings_and_escaped_quotes():
    assert scan(b'["[[[[", "\\"[[", {"a": ["]]]"]}]', 100) == 3
    assert loads(b'[["' + b"[" * 50 + b'"]]', LIMITS) == [["[" * 50]]


@pytest.mark.parametrize("text,message", [
    (b"[" * 9 + b"]" * 9, "is nested deeper than 8 levels"),
    (b"[" + b",".join([b"[]"] * 101) + b"]", "holds more than 100 JSON objects and arrays"),
    (b"[" + b",".join([b"1"] * 202) + b"]", "holds more than 200 JSON values"),
    (b"[" + b"1" * 41 + b"]", "holds a number literal longer than 40 characters"),
    (b"[1." + b"1" * 40 + b"]", "holds a number literal longer than 40 characters"),
    (b"[1e400]", "holds a number too large for a float"),
    (b"[NaN]", "holds NaN, which is not JSON"),
    (b"[-Infinity]", "holds -Infinity, which is not JSON"),
    (b'["\\ud800"]', "holds a lone surrogate (invalid Unicode) in a string"),
    (b'{"\\udc00x": 1}', "holds a lone surrogate (invalid Unicode) in a string"),
    (b'["\xed\xa0\x80"]', "is not valid UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b"\xff", "is not valid UTF-8"),
    (b"[1,]", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"x" * ((1 << 20) + 1), "is larger than 1048576 bytes"),
])
def test_refused(text, message):
    with pytest.raises(JSONLimitError) as exc:
        loads(text, LIMITS)
    assert str(exc.value) == message


@pytest.mark.parametrize("text,message", [
    (b"[" + b",".join([b"[]"] * 101) + b"]", "holds more than 100 JSON objects and arrays"),
    (b"[" + b",".join([b"1"] * 202) + b"]", "holds more than 200 JSON values"),
    (b"x" * ((1 << 20) + 1), "is larger than 1048576 bytes"),
    (b"[" * 9 + b"]" * 9, None),  # depth and syntax are the parser's: counts alone cannot see them
    (b"[1,]", None),
])
def test_size_problem_is_what_loads_checks_before_parsing(text, message):
    # Writers (build_header) call size_problem on what they are about to write: it must agree with loads.
    assert size_problem(text, LIMITS) == message


def test_accepted_edge_cases():
    assert loads(b'["\\ud83d\\ude00", "\\\\ud800", 1' + b"0" * 39 + b", -0.0, 1e308]", LIMITS) == \
        ["\U0001f600", "\\ud800", 10**39, -0.0, 1e308]
    assert loads(b"[" * 8 + b"]" * 8, LIMITS) == [[[[[[[[]]]]]]]]
    with pytest.raises(TypeError, match="data must be bytes"):
        loads("[]", LIMITS)  # type: ignore[arg-type]


@pytest.mark.parametrize("value,problem", [
    ({"a": [1, "x", None, 2.5, True]}, None),
    ({"a": float("inf")}, "a number is NaN or infinite"),
    ({"a": "\ud800"}, "a string holds a lone surrogate (invalid Unicode)"),
    ({"a": "x" * 11}, "a string is longer than 10 characters"),
    ({1: 2}, "an object has a key that is not a string"),
    ({"a": b"x"}, "it holds a bytes, which is not a JSON type"),
    ({"a": 10**40}, "an integer has more than 40 digits"),
    ([[[[]]]], "it is nested deeper than 3 levels"),
    ([[[]]], None),
])
def test_check_tree(value, problem):
    assert check_tree(value, max_depth=3, max_str=10) == problem
