"""Bounded JSON for untrusted files (container headers, device profiles).

``json.loads`` alone lets a small or mid-sized file cost far more than its size: a 100 MiB array of ``{}`` takes
GBs of memory, deep nesting raises ``RecursionError``, a 5,000-digit integer literal raises ``ValueError`` (and
would cost quadratic time below Python's digit limit), ``Infinity`` and ``1e999`` become non-finite floats, and
``"\\ud800"`` becomes a lone surrogate that crashes a later ``str.encode``. :func:`loads` refuses all of these
with :class:`JSONLimitError` before or while parsing, so work stays proportional to the caps, not to the claim.

The pre-scan that enforces the nesting depth runs over the raw bytes in fixed-size chunks with numpy (a string-
aware bracket count), so it costs a few passes over the input and a bounded amount of memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["JSONLimitError", "Limits", "canonical", "check_tree", "is_hex", "is_int", "loads", "scan", "show",
           "size_problem"]

_SCAN_CHUNK = 4 << 20
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENS, _CLOSES = (ord("{"), ord("[")), (ord("}"), ord("]"))
#: A ``\uD800``-``\uDFFF`` escape: the only way a lone surrogate gets into a string parsed from valid UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LOWER_HEX = re.compile(r"[0-9a-f]*")


class JSONLimitError(ValueError):
    """The text is not JSON, or it exceeds one of the :class:`Limits`.

    The message is a phrase that completes "the <document> ...", e.g. ``"is nested deeper than 64 levels"``.
    """


@dataclass(frozen=True)
class Limits:
    """Caps on one JSON document.

    Args:
        max_bytes: Size of the encoded document.
        max_depth: Nesting depth of objects and arrays (``[]`` is depth 1).
        max_containers: Number of ``{`` and ``[`` bytes anywhere in the text (strings included, so an embedded
            JSON document in a string counts too): bounds the objects and arrays all parses of it can create.
        max_items: Number of ``,`` bytes anywhere in the text: bounds the values and keys.
        max_number_chars: Length of a number literal (an int of 40 digits takes microseconds; Python refuses
            4,300 and is quadratic below that).
    """

    max_bytes: int
    max_depth: int = 64
    max_containers: int = 2_000_000
    max_items: int = 3_000_000
    max_number_chars: int = 40


def scan(data: bytes, max_depth: int) -> int:
    """Nesting depth of the JSON text ``data``, computed without parsing; stops early once over ``max_depth``.

    Brackets inside strings are ignored: a quote preceded by an odd run of backslashes does not end a string.
    For text that is not JSON the result is only meaningful up to the first syntax error, which the parser
    reports anyway.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    depth = deepest = 0
    in_string = False
    escape_next = False  # the previous chunk ended with an odd run of backslashes
    for start in range(0, arr.size, _SCAN_CHUNK):
        a = arr[start:start + _SCAN_CHUNK]
        escaped = np.zeros(a.size, dtype=bool)
        if escape_next:
            escaped[0] = True
        bs = np.flatnonzero(a == _BACKSLASH)
        escape_next = False
        if bs.size:
            # Runs of consecutive backslashes; a run of odd length escapes the byte after it. A run that starts
            # at the chunk's first byte continues one that an escaped first byte would have ended: count it in.
            breaks = np.flatnonzero(np.diff(bs) != 1)
            run_start = np.concatenate(([bs[0]], bs[breaks + 1]))
            run_end = np.concatenate((bs[breaks], [bs[-1]])) + 1
            length = run_end - run_start
            if run_start[0] == 0 and escaped[0]:
                escaped[0] = False
                length[0] += 1
            odd = run_end[(length % 2) == 1]
            if odd.size and odd[-1] == a.size:
                escape_next = True
                odd = odd[:-1]
            escaped[odd] = True
        quotes = (a == _QUOTE) & ~escaped
        inside = (np.cumsum(quotes, dtype=np.int32) + in_string) % 2 == 1
        in_string = bool(inside[-1]) if a.size else in_string
        step = (((a == _OPENS[0]) | (a == _OPENS[1])) & ~inside).astype(np.int8)
        step -= (((a == _CLOSES[0]) | (a == _CLOSES[1])) & ~inside).astype(np.int8)
        running = np.cumsum(step, dtype=np.int32) + depth
        if running.size:
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
        if deepest > max_depth:
            break
    return deepest


def size_problem(data: bytes, limits: Limits) -> str | None:
    """Why ``data`` exceeds the byte-count caps of ``limits`` (size, ``{``/``[`` and ``,`` bytes), or ``None``.

    These are the checks :func:`loads` makes before parsing; a writer calls this on the bytes it is about to
    write so that it never produces a document the reader would refuse (counts only, no parse).
    """
    return _count(data, limits)[0]


def _count(data: bytes, limits: Limits) -> tuple[str | None, int]:
    # (size_problem, number of "{" and "[" bytes); the count is 0 when the size alone is over the cap.
    if len(data) > limits.max_bytes:
        return f"is larger than {limits.max_bytes} bytes", 0
    containers = data.count(b"{") + data.count(b"[")
    if containers > limits.max_containers:
        return f"holds more than {limits.max_containers} JSON objects and arrays", containers
    if data.count(b",") > limits.max_items:
        return f"holds more than {limits.max_items} JSON values", containers
    return None, containers


def loads(data: bytes, limits: Limits) -> Any:
    """Parse the UTF-8 JSON document ``data`` within ``limits``.

    Raises:
        JSONLimitError: Not UTF-8 or not JSON; over a cap; a number literal too long; ``NaN``, ``Infinity`` or
            a float literal that overflows; a lone surrogate in a string.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("data must be bytes")
    data = bytes(data)
    problem, containers = _count(data, limits)
    if problem:
        raise JSONLimitError(problem)
    # Depth is at most the number of opening brackets, so small documents skip the scan.
    if containers > limits.max_depth and scan(data, limits.max_depth) > limits.max_depth:
        raise JSONLimitError(f"is nested deeper than {limits.max_depth} levels")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONLimitError("is not valid UTF-8") from None
    cap = limits.max_number_chars

    def parse_int(s: str) -> int:
        if len(s) > cap:
            raise JSONLimitError(f"holds a number literal longer than {cap} characters")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > cap:
            raise JSONLimitError(f"holds a number literal longer than {cap} characters")
        f = float(s)
        if not math.isfinite(f):
            raise JSONLimitError("holds a number too large for a float")
        return f

    def parse_constant(s: str) -> Any:
        raise JSONLimitError(f"holds {s}, which is not JSON")

    try:
        obj = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except JSONLimitError:
        raise
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise JSONLimitError("is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise JSONLimitError("holds a lone surrogate (invalid Unicode) in a string")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    # Iterative: the depth is capped, but a walk without recursion cannot fail whatever the cap.
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return True
        elif isinstance(x, dict):
            stack.extend(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def check_tree(obj: Any, *, max_depth: int, max_str: int) -> str | None:
    """Why the parsed JSON value ``obj`` is unfit as free-form data, or ``None``.

    Checks what :func:`loads` guarantees for values built in memory: only JSON types (str keys), depth at most
    ``max_depth``, finite floats, strings of at most ``max_str`` characters without lone surrogates.
    """
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, str):
            if len(x) > max_str:
                return f"a string is longer than {max_str} characters"
            if _SURROGATE.search(x):
                return "a string holds a lone surrogate (invalid Unicode)"
        elif isinstance(x, bool) or x is None:
            continue
        elif isinstance(x, int):
            if abs(x) >= 10**40:
                return "an integer has more than 40 digits"
        elif isinstance(x, float):
            if not math.isfinite(x):
                return "a number is NaN or infinite"
        elif isinstance(x, (dict, list)):
            if depth > max_depth:
                return f"it is nested deeper than {max_depth} levels"
            if isinstance(x, dict):
                if not all(isinstance(k, str) for k in x):
                    return "an object has a key that is not a string"
                stack.extend((k, depth) for k in x)
                stack.extend((v, depth + 1) for v in x.values())
            else:
                stack.extend((v, depth + 1) for v in x)
        else:
            return f"it holds a {type(x).__name__}, which is not a JSON type"
    return None


def is_int(x: object) -> bool:
    """Whether the parsed JSON value ``x`` is an integer (``true`` and ``false`` parse as bools, which are ints)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_hex(x: object, nbytes: int) -> bool:
    """Whether the parsed JSON value ``x`` is exactly ``nbytes`` bytes written as lowercase hex.

    Lowercase only, so each value has one spelling: a digest or key compared as text cannot differ by case.
    """
    return isinstance(x, str) and len(x) == 2 * nbytes and _LOWER_HEX.fullmatch(x) is not None


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces): what digests, MACs and signatures cover.

    Example:
        >>> canonical({"b": 1, "a": [1, 2]})
        b'{"a":[1,2],"b":1}'
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def show(x: object, width: int = 40) -> str:
    """A short repr of an untrusted value for messages: a hostile file may hold megabyte-long values."""
    r = repr(x)
    return r if len(r) <= width else r[:width - 3] + "..."
