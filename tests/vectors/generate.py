"""Regenerate the known-answer vectors in this folder from the current code.

Run only when a format change is intended (and bump the format version): the vectors exist so that files
written by an earlier chiplock keep unlocking bit-exactly.

    .venv/bin/python tests/vectors/generate.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import torch

HERE = Path(__file__).parent

#: Fixed inputs shared by the generator and the tests.
KEY = bytes(range(32))
NONCE = bytes(range(100, 116))
SALT = bytes(range(16))


def vector_tensors() -> dict[str, torch.Tensor]:
    """Deterministic tensors built from integers (bit-identical on every platform)."""
    i = torch.arange(-150, 150, dtype=torch.int64)
    f32 = (i * 37 % 101).to(torch.float32) / 64.0
    f32[7], f32[8] = float("inf"), -0.0
    return {
        "f32_small": f32[:40].clone(),                                  # < SMALL_N: bounds model
        "f32_model": f32.clone(),                                       # quantile model, with inf (escape)
        "f16_model": (f32 / 4).to(torch.float16),
        "bf16_model": (f32 * 3).to(torch.bfloat16),
        "i8_model": (i % 113 - 56).to(torch.int8),
        "i64_model": i * 1_000_003,
        "bool": (i % 3 == 0),
        "u8_scalar": torch.tensor(201, dtype=torch.uint8),
        "f64_raw": i.to(torch.float64) / 3.0,
        # float8 (pre-aes v2 rounds to it in its decoder); only on torch builds that have it.
        **({"f8_e4m3_model": (f32 / 8).to(torch.float8_e4m3fn)} if hasattr(torch, "float8_e4m3fn") else {}),
    }


def _hex(t: torch.Tensor) -> str:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex() if t.numel() else ""


def transform_vectors() -> dict:
    from chiplock.transforms import get_transform

    out: dict = {"key": KEY.hex(), "nonce": NONCE.hex(), "cases": []}
    for name in ("aes", "shuffle", "pre-aes"):
        for tname, t in vector_tensors().items():
            with mock.patch("os.urandom", lambda n: NONCE[:n]):
                enc = get_transform(name).encode(t, KEY)
            stored = np.ascontiguousarray(enc.data).reshape(-1).view(np.uint8).tobytes()
            out["cases"].append({"transform": name, "tensor": tname, "dtype": str(t.dtype).split(".")[-1],
                                 "shape": list(t.shape), "plain": _hex(t), "params": enc.params,
                                 "stored": stored.hex()})
    # The blocked shuffle path (> FULL_MAX elements) is recorded by digest only.
    from chiplock.transforms.shuffle import FULL_MAX

    big = torch.arange(FULL_MAX + 1000, dtype=torch.int32)
    enc = get_transform("shuffle").encode(big, KEY)
    out["shuffle_blocked"] = {"n": int(big.numel()), "sha256": hashlib.sha256(enc.data.tobytes()).hexdigest()}
    return out


def kdf_vectors() -> dict:
    from chiplock.keys import INSECURE_FAST, KdfParams, MasterKDF, assemble_material, subkey

    materials = {"precision": bytes(range(32)), "clock": b"\x01\x02"}
    material = assemble_material(materials, None)
    material_s = assemble_material(materials, b"vendor secret")
    master = MasterKDF(params=KdfParams(salt=SALT, **INSECURE_FAST)).derive(material)
    return {
        "materials": {k: v.hex() for k, v in materials.items()},
        "secret": b"vendor secret".hex(),
        "assembled": material.hex(),
        "assembled_with_secret": material_s.hex(),
        "salt": SALT.hex(),
        "params": dict(INSECURE_FAST),
        "master": master.hex(),
        "subkeys": [{"purpose": p, "context": c, "key": subkey(master, p, c).hex()}
                    for p, c in (("check", ""), ("tensor/aes", "conv.weight"), ("tensor/pre-aes", "fc.bias"),
                                 ("tensor/shuffle", "名前"))],
    }


def tree_vectors() -> dict:
    from chiplock._digest import TREE_CHUNK, tree_digest

    cases = {}
    for n in (0, 1, 1000, TREE_CHUNK, TREE_CHUNK + 1):
        data = (np.arange(n, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
        cases[str(n)] = tree_digest(data)
    return cases


def main() -> None:
    os.chdir(HERE)
    (HERE / "transforms.json").write_text(json.dumps(transform_vectors(), indent=1) + "\n")
    (HERE / "kdf.json").write_text(json.dumps(kdf_vectors(), indent=1, ensure_ascii=False) + "\n")
    (HERE / "tree_digest.json").write_text(json.dumps(tree_vectors(), indent=1) + "\n")


if __name__ == "__main__":
    main()
