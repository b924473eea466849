"""Shared fixtures for the chiplock test suite.

Every test that locks passes ``kdf=fast_kdf`` (Argon2id at 8 KiB, one pass) so the suite stays fast; the
default parameters are exercised only where their values are checked.

The ``profile`` fixture rests on the precision source alone (12.5 bits), which ``lock`` refuses without a
vendor secret (``WeakKey``). A test passes ``secret=`` where that is the usage it checks, and
``allow_weak_key=True`` where it is about something else and a secret would change what it checks.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import chiplock
from chiplock.container.schema import header_digest
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture
def fast_kdf() -> KdfParams:
    """Insecure, fast Argon2id parameters (fresh salt per test)."""
    return KdfParams(**INSECURE_FAST)


@pytest.fixture(scope="session")
def profile() -> chiplock.DeviceProfile:
    """This machine, enrolled once per test process with the precision source (a weak key: see above).

    Its stored device key uses the insecure fast Argon2id parameters, so tests that issue or open a licence with
    the stored key stay fast.
    """
    return chiplock.enroll(kdf=KdfParams(**INSECURE_FAST))


@pytest.fixture(scope="session")
def wrong_profile(profile: chiplock.DeviceProfile) -> chiplock.DeviceProfile:
    """A "different machine": same public helper data, different (random) key material."""
    e = profile.enrollments[0]
    return chiplock.DeviceProfile(enrollments=(
        Enrollment(source=e.source, helper=dict(e.helper), material=os.urandom(32)),))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits (offline), split 80/20 with a fixed seed."""
    from chiplock_demo.data import load_digits8

    return load_digits8()


@pytest.fixture(scope="session")
def trained_model(digits):
    """A SmallCNN (width 8) trained for a few epochs on the 8x8 digits (about 90 % test accuracy, ~2 s)."""
    from chiplock_demo.models import SmallCNN
    from chiplock_demo.training import accuracy, train_classifier

    # One thread: on a busy 2-core machine torch's thread pool is several times slower for these tiny ops.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = SmallCNN(num_classes=10, image_size=8, width=8)
        train_classifier(model, digits.x_train, digits.y_train, epochs=6, seed=0)
    finally:
        torch.set_num_threads(threads)
    acc = accuracy(model, digits.x_test, digits.y_test)
    assert acc > 0.85, f"the fixture model trained badly ({acc:.3f}); the destruction tests would be meaningless"
    return model


def raw_bytes(t: torch.Tensor) -> bytes:
    """The exact bits of ``t`` (NaN payloads and signed zeros included)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


@pytest.fixture(scope="session")
def assert_bit_exact() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Assert two tensors have the same dtype, shape and bits."""

    def check(got: torch.Tensor, want: torch.Tensor, what: str = "tensor") -> None:
        assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, not a tensor"
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
        assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if raw_bytes(got) != raw_bytes(want):
            g = got.detach().reshape(-1).view(torch.uint8) if got.numel() else got
            w = want.detach().reshape(-1).view(torch.uint8) if want.numel() else want
            first = int(torch.nonzero(g != w)[0]) if got.numel() else -1
            raise AssertionError(f"{what}: bits differ (first differing byte {first})")

    return check


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Split a container into (chiplock metadata, raw safetensors header, tensor bytes).

    The metadata is the v3 JSON: ``groups`` (label -> transform, mac), ``tensors``, the embedded ``license`` (its
    ``sources``, ``kdf``, ``secret`` and ``wraps``) in single-file mode, ``header_digest`` and ``signature``.
    """
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["chiplock"])
    return meta, header, raw[8 + n:]


def write_container(path: str | os.PathLike, meta: dict[str, Any], header: dict[str, Any], data: bytes, *,
                    redigest: bool = True) -> None:
    """Write a container from parts, recomputing the header digest as a tamperer would (unless told not to)."""
    meta = dict(meta)
    if redigest:
        meta["header_digest"] = header_digest(meta)
    header = dict(header)
    header["__metadata__"] = {"chiplock": json.dumps(meta, sort_keys=True)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="session")
def container_io():
    """``(read_container, write_container)`` helpers for tests that rewrite a container."""
    return read_container, write_container


def chi_square_bytes_p(data: bytes | np.ndarray) -> float:
    """p-value of a chi-square test that the byte values of ``data`` are uniform over 0..255."""
    from scipy.stats import chisquare

    arr = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    counts = np.bincount(arr.reshape(-1), minlength=256)
    return float(chisquare(counts).pvalue)


@pytest.fixture(scope="session")
def byte_uniformity_p() -> Callable[[bytes | np.ndarray], float]:
    return chi_square_bytes_p


@pytest.fixture
def fixed_nonce(monkeypatch):
    """Make ``os.urandom`` deterministic so encodings (and statistical p-values) are reproducible.

    Returns a function that re-seeds the stream.
    """
    state = {"rng": np.random.Generator(np.random.PCG64(1234))}

    def urandom(n: int) -> bytes:
        return state["rng"].bytes(n)

    def reseed(seed: int) -> None:
        state["rng"] = np.random.Generator(np.random.PCG64(seed))

    monkeypatch.setattr(os, "urandom", urandom)
    return reseed


#: Every dtype the transforms promise to handle.
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.bool)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MODES = ("normal", "bits", "specials", "constant", "few")


def _specials(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.tensor([False, True])
    if dtype.is_floating_point:
        fi = torch.finfo(dtype)
        vals = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, fi.max, fi.min, fi.tiny, -fi.tiny,
                fi.tiny / 4, fi.eps, 1.0, -1.0]
        t = torch.tensor(vals, dtype=torch.float64).to(dtype)
        # A NaN with a non-default payload and the sign bit set.
        w = t.element_size()
        nan_bits = torch.tensor([(1 << (8 * w)) - 1 - 5], dtype=torch.int64).to(_SIGNED[w]) if w < 8 else \
            torch.tensor([-6], dtype=torch.int64)
        return torch.cat([t, nan_bits.view(dtype)])
    ii = torch.iinfo(dtype)
    return torch.tensor([ii.min, ii.max, 0, 1, -1 if ii.min < 0 else 2, ii.min + 1, ii.max - 1], dtype=dtype)


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], mode: str = "normal", seed: int = 0) -> torch.Tensor:
    """A reproducible test tensor: ``normal`` values, raw random ``bits``, ``specials`` mixed into normal
    values (NaN payloads, +-inf, -0.0, extremes, subnormals), a ``constant`` or a ``few`` distinct values.

    The result is a fresh, contiguous tensor with standard strides.
    """
    flat = _make_flat(dtype, tuple(shape), mode, seed)
    out = torch.empty(tuple(shape), dtype=dtype)
    out.copy_(flat.reshape(tuple(shape)))
    return out


def _make_flat(dtype: torch.dtype, shape: tuple[int, ...], mode: str, seed: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        flat = torch.from_numpy(rng.integers(0, 2, n).astype(np.bool_)) if mode != "constant" else \
            torch.ones(n, dtype=torch.bool)
        return flat.reshape(shape)
    w = torch.empty((), dtype=dtype).element_size()
    if mode == "bits":
        bits = rng.integers(0, np.iinfo(_UINT[w]).max, n, dtype=_UINT[w], endpoint=True)
        flat = torch.from_numpy(bits.view(np.dtype(f"i{w}") if w > 1 else np.int8).copy()).view(dtype) \
            if dtype != torch.uint8 else torch.from_numpy(bits.copy())
        return flat.reshape(shape)
    if dtype.is_floating_point:
        scale = float(10.0 ** rng.uniform(-3, 2))
        flat = torch.from_numpy(rng.standard_normal(n) * scale).to(dtype)
    else:
        ii = torch.iinfo(dtype)
        lo, hi = max(ii.min, -100), min(ii.max, 100)
        flat = torch.from_numpy(rng.integers(lo, hi, n, endpoint=True)).to(dtype)
    if mode == "constant":
        flat = flat[:1].expand(n).clone() if n else flat
    elif mode == "few" and n:
        flat = flat[torch.from_numpy(rng.integers(0, min(3, n), n))]
    elif mode == "specials" and n:
        sp = _specials(dtype)
        idx = torch.from_numpy(rng.integers(0, n, min(n, 2 * len(sp))))
        flat[idx] = sp[torch.arange(len(idx)) % len(sp)]
    return flat.reshape(shape)


@pytest.fixture(scope="session")
def tensor_factory() -> Callable[..., torch.Tensor]:
    """:func:`make_tensor`: ``tensor_factory(dtype, shape, mode="normal", seed=0)``."""
    return make_tensor


@pytest.fixture(scope="session")
def check_transform_vectors(assert_bit_exact) -> Callable[[str], None]:
    """``check(name)``: the transform's known-answer vectors in tests/vectors/transforms.json."""
    from chiplock.transforms import get_transform

    def check(name: str) -> None:
        """Shared with the other transforms' tests: old stored bytes keep decoding to the same bits, and encoding
        with the same key and nonce reproduces them."""
        from unittest import mock

        vec = json.loads((VECTORS / "transforms.json").read_text())
        key, nonce = bytes.fromhex(vec["key"]), bytes.fromhex(vec["nonce"])
        tf = get_transform(name)
        cases = [c for c in vec["cases"] if c["transform"] == name]
        assert cases
        for c in cases:
            dtype = getattr(torch, c["dtype"])
            shape = tuple(c["shape"])
            plain = np.frombuffer(bytes.fromhex(c["plain"]), dtype=np.uint8).copy()
            want = torch.from_numpy(plain).view(dtype).reshape(shape) if plain.size else torch.empty(shape, dtype=dtype)
            stored = np.frombuffer(bytes.fromhex(c["stored"]), dtype=np.uint8)
            assert_bit_exact(tf.decode(stored, c["params"], key, dtype, shape), want, f"{name}/{c['tensor']} decode")
            with mock.patch("os.urandom", lambda n: nonce[:n]):
                enc = tf.encode(want, key)
            assert enc.params == c["params"], f"{name}/{c['tensor']}: public parameters changed"
            assert np.ascontiguousarray(enc.data).reshape(-1).view(np.uint8).tobytes().hex() == c["stored"], \
                f"{name}/{c['tensor']}: stored bytes changed (a format change needs a new version)"

    return check


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny tensor ops: the pool only adds OpenMP spin-waiting on a busy
    2-core machine. Folders that want it for every test request it from an autouse fixture of their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
