"""Fuzz the readers: containers (every transform, two groups, content mode; signed and unsigned) and device profiles.

Pass: whatever the input, only :class:`~chiplock.ChiplockError` subclasses escape ``inspect``, ``unlock`` and
``DeviceProfile.load`` (and ``lock`` with a profile that loaded), and no input takes more than
:data:`TIME_LIMIT_S`.

Budget: ``CHIPLOCK_FUZZ_EXAMPLES`` inputs in all (default 2,000, deterministic: hypothesis derandomized, no
example database). ``make fuzz`` runs 100,000 and writes the figures (inputs, slowest input, peak RSS) to the
JSON file named by ``CHIPLOCK_FUZZ_REPORT``.

Structural mutations recompute the header digest (and, half the time for signed files, the signature with the
vendor key) as a tamperer would, so they reach the checks behind them. The device's KDF memory cap is lowered to
256 KiB here (``CHIPLOCK_MAX_KDF_MEMORY_KIB``) so a mutated cost inside the caps stays fast.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st

import chiplock
from chiplock import ChiplockError, DeviceProfile
from chiplock.container.schema import canonical, header_digest
from chiplock.keys import INSECURE_FAST, KdfParams

# Slow (about 20 s for the 2,000 inputs): `make test` runs it, `make test-fast` does not.
pytestmark = [pytest.mark.filterwarnings("ignore::chiplock.LowEntropyWarning"), pytest.mark.slow]

EXAMPLES = int(os.environ.get("CHIPLOCK_FUZZ_EXAMPLES", "2000"))
REPORT = os.environ.get("CHIPLOCK_FUZZ_REPORT")
TIME_LIMIT_S = 10.0
SECRET = b"vendor secret for the fuzzer"
VENDOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRANSFORMS = ("aes", "shuffle", "pre-aes")
#: Valid files the mutations start from: one per transform, one with two groups of two transforms (aes + shuffle),
#: and a content-mode file (no embedded licence: unlock asks for one, the reader still checks everything).
KINDS = TRANSFORMS + ("groups", "content")
STATS: dict[str, Any] = {"inputs": 0, "max_s": 0.0, "slowest": None, "by_test": {}}


def _settings(share: float) -> settings:
    return settings(max_examples=max(1, int(EXAMPLES * share)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def small_kdf_cap():
    old = os.environ.get("CHIPLOCK_MAX_KDF_MEMORY_KIB")
    os.environ["CHIPLOCK_MAX_KDF_MEMORY_KIB"] = "256"
    yield
    if old is None:
        del os.environ["CHIPLOCK_MAX_KDF_MEMORY_KIB"]
    else:
        os.environ["CHIPLOCK_MAX_KDF_MEMORY_KIB"] = old
    if REPORT:
        _write_report()
    print(f"\nfuzz: {STATS['inputs']} inputs, slowest {STATS['max_s']:.3f} s wall ({STATS['slowest']}), "
          f"{STATS.get('max_cpu_s', 0.0):.3f} s CPU, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _write_report() -> None:
    STATS["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(REPORT).write_text(json.dumps(STATS, indent=2))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_files(profile, workdir) -> dict[tuple[str, bool], bytes]:
    w = {"a": torch.randn(150, generator=torch.Generator().manual_seed(0)),
         "b": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).half(),
         "c": torch.tensor([1, 2, 3], dtype=torch.int8), "d": torch.tensor(2.5, dtype=torch.bfloat16)}
    files = {}
    for kind in KINDS:
        for signed in (False, True):
            path = workdir / f"{kind}-{signed}.chiplock"
            key = VENDOR if signed else None
            if kind == "groups":
                cfg = chiplock.LockConfig(transform="aes", groups=(chiplock.GroupConfig("head", "shuffle", ("b",)),))
                chiplock.lock(w, path, profile, config=cfg, secret=SECRET, kdf=KdfParams(**INSECURE_FAST),
                              signing_key=key)
            elif kind == "content":
                chiplock.lock(w, path, transform="pre-aes", content_keys_path=workdir / f"{kind}-{signed}.keys",
                              signing_key=key)
            else:
                chiplock.lock(w, path, profile, kind, secret=SECRET, kdf=KdfParams(**INSECURE_FAST), signing_key=key)
            files[(kind, signed)] = path.read_bytes()
    return files


def _timed(label: str, fn) -> None:
    # CPU time (all threads) decides, so a busy shared machine cannot fail the test; wall time is reported.
    start, cpu = time.perf_counter(), time.process_time()
    try:
        fn()
    except ChiplockError:
        pass
    # Anything else propagates and fails the test, with the input hypothesis found.
    took, took_cpu = time.perf_counter() - start, time.process_time() - cpu
    STATS["inputs"] += 1
    STATS["by_test"][label] = STATS["by_test"].get(label, 0) + 1
    if took > STATS["max_s"]:
        STATS["max_s"], STATS["slowest"] = took, label
    STATS["max_cpu_s"] = max(STATS.get("max_cpu_s", 0.0), took_cpu)
    if REPORT and STATS["inputs"] % 1000 == 0:
        _write_report()  # partial figures survive an interrupted long run
    assert took_cpu < TIME_LIMIT_S, f"{label}: one input took {took_cpu:.1f} s of CPU"


def _exercise(data: bytes, profile, workdir: Path, label: str, signed: bool) -> None:
    path = workdir / "input.chiplock"
    path.write_bytes(data)

    def run() -> None:
        for fn in (lambda: chiplock.inspect(path), lambda: chiplock.unlock(path, profile=profile, secret=SECRET),
                   lambda: chiplock.unlock(path, profile=profile, secret=SECRET,
                                           verify_key=VENDOR.public_key()) if signed else None):
            try:
                fn()
            except ChiplockError:
                pass

    _timed(label, run)


# --- byte mutations -------------------------------------------------------------------------------------------

flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6)


@_settings(0.2)
@given(which=st.sampled_from(KINDS), signed=st.booleans(), flips=flips, in_header=st.booleans(),
       cut=st.one_of(st.none(), st.floats(0, 1)), extra=st.binary(max_size=16))
def test_byte_mutations(which, signed, flips, in_header, cut, extra, valid_files, profile, workdir):
    data = bytearray(valid_files[(which, signed)])
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    span = 8 + n if in_header else len(data)
    for where, xor in flips:
        data[int(where * span)] ^= xor
    if cut is not None:
        data = data[:int(cut * len(data))]
    _exercise(bytes(data) + extra, profile, workdir, "container bytes", signed)


# --- structural mutations -------------------------------------------------------------------------------------


class Raw:
    """JSON text spliced in verbatim: what json.dumps cannot write (deep nesting, long literals, bad escapes)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r}{'...' if len(self.text) > 30 else ''} [{len(self.text)} chars])"


RAW = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999"), Raw("9" * 41),
       Raw("9" * 5000), Raw("1" + "0" * 400 + ".5"), Raw("[" * 70 + "]" * 70), Raw("[" * 3000 + "]" * 3000),
       Raw("{\"a\":" * 100 + "1" + "}" * 100), Raw('"\\ud800"'), Raw('"a\\udfffb"'), Raw('"\\ud83d\\ude00"'),
       Raw('{"k":1,"k":2}'), Raw("[" + ",".join(["140737488355327"] * 60_000) + "]"),
       Raw("[" + ",".join(["{}"] * 20_000) + "]"), Raw('"\\u0000"'), Raw("-0"), Raw("1E+2"), Raw("0.0000001")]
HEXES = ["0" * 32, "0" * 64, "0" * 128, "ab" * 16, "AB" * 16, "zz" * 16, "0" * 31, "0" * 63, "0" * 127, "",
         "0" * 24, "0" * 96]
WORDS = ["aes", "shuffle", "pre-aes", "ed25519", "argon2id", "F32", "U16", "U64", "BOOL", "F8_E4M3", "C64",
         "precision", "sram", "__metadata__", "\x00", "\ud800", "a\udfffb", "x" * 2000, "chiplock", "model", "raw",
         "main", "aes-256-gcm", "aes-256-ctr"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, -1, 2, 7, 8, 16, 64, 65, 1000, 1001, 2**31, 2**47 - 1, 2**48, 2**63,
                                     2**64, 10**40, 256, 257, 1 << 20, (1 << 20) + 1, 4 << 20]),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                    st.sampled_from(HEXES + WORDS))
nasty = st.one_of(scalars, st.sampled_from(RAW),
                  st.lists(scalars, max_size=5), st.dictionaries(st.text(max_size=6), scalars, max_size=4),
                  st.lists(st.integers(0, 2**47), min_size=0, max_size=70))


def _dumps(value: Any, raws: list[Raw], **kw) -> str:
    """json.dumps, with each Raw replaced by its text."""
    def default(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o)
            return f"\x00RAW{len(raws) - 1}\x00"
        raise TypeError(type(o).__name__)

    text = json.dumps(value, default=default, **kw)
    for i, r in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), r.text)
    return text


def _mutate(value: Any, draw, depth: int = 0) -> Any:
    """Walk into ``value`` along a drawn path and replace, delete or add one thing there.

    The walk always leaves the root (replacing a whole document only tests the first check) and then goes one
    level deeper with probability 3/4.
    """
    if isinstance(value, (dict, list)) and value and (depth == 0 or draw(st.integers(0, 3)) > 0):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        k = draw(st.sampled_from(keys))
        value[k] = _mutate(value[k], draw, depth + 1)
        return value
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    if action == "replace" or not isinstance(value, (dict, list)):
        return draw(nasty)
    if action == "delete" and value:
        if isinstance(value, dict):
            del value[draw(st.sampled_from(sorted(value)))]
        else:
            del value[draw(st.integers(0, len(value) - 1))]
        return value
    if isinstance(value, dict):
        value[draw(st.sampled_from(["extra", "", "__metadata__", "signature", "mac", "alg", "dtype", "license",
                                    "group", "wraps", "shard", "transform"]))] = \
            draw(nasty)
    else:
        value.append(draw(nasty))
    return value


def _rebuild(raw: bytes, draw) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["chiplock"])
    where = draw(st.sampled_from(["meta", "meta", "meta", "header"]))
    raws: list[Raw] = []
    if where == "meta":
        meta = _mutate(meta, draw)
        meta_text = _dumps(meta, raws, sort_keys=True)
        try:
            parsed = json.loads(meta_text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            # As a tamperer would: a fresh digest, and for a signed file sometimes a fresh vendor signature.
            parsed["header_digest"] = header_digest(parsed)
            if isinstance(parsed.get("signature"), dict) and draw(st.booleans()):
                parsed["signature"] = {"alg": "ed25519", "public_key": VENDOR.public_key().public_bytes_raw().hex(),
                                       "sig": VENDOR.sign(canonical(parsed)).hex()}
            if not raws:
                meta_text = json.dumps(parsed, sort_keys=True)
        header["__metadata__"]["chiplock"] = meta_text
        body = json.dumps(header, separators=(",", ":"))
    else:
        header = _mutate(header, draw)
        body = _dumps(header, raws, separators=(",", ":"))
    encoded = body.encode("utf-8", "surrogatepass")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:]


@_settings(0.5)
@given(which=st.sampled_from(KINDS), signed=st.booleans(), data=st.data())
def test_structural_mutations(which, signed, data, valid_files, profile, workdir):
    mutated = _rebuild(valid_files[(which, signed)], data.draw)
    _exercise(mutated, profile, workdir, "container structure", signed)


# --- profiles -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile_json(profile) -> dict[str, Any]:
    data = profile.to_json()
    data["enrollments"][0]["info"] = {"note": "fuzz", "probes": [1, 2.5, None]}
    return data


@_settings(0.3)
@given(data=st.data(), as_bytes=st.booleans())
def test_profile_mutations(data, as_bytes, profile_json, workdir):
    doc = json.loads(json.dumps(profile_json))
    if as_bytes:
        raw = bytearray(json.dumps(doc, indent=2).encode())
        for where, xor in data.draw(flips):
            raw[int(where * len(raw))] ^= xor
        text = bytes(raw)
    else:
        raws: list[Raw] = []
        text = _dumps(_mutate(doc, data.draw), raws).encode("utf-8", "surrogatepass")
    path = workdir / "profile.json"
    path.write_bytes(text)
    out = workdir / "from-profile.chiplock"

    def run() -> None:
        loaded = DeviceProfile.load(path)
        # A profile that loads must not crash lock (nor the unlock of what it locked).
        w = {"w": torch.arange(6, dtype=torch.float32)}
        chiplock.lock(w, out, loaded, "aes", secret=SECRET, kdf=KdfParams(**INSECURE_FAST), force=True)
        got = chiplock.unlock(out, profile=loaded, secret=SECRET)
        assert torch.equal(got["w"], w["w"])

    _timed("profile", run)
