"""Licence issuing cost: 10,000 per-device licences for one model, and opening one on the right device.

    .venv/bin/python benchmarks/license_issue.py [--devices 10000] [--out bench/results]

The device profiles are synthesized, not enrolled: each copies the public helper data of one simulated SRAM
enrollment (a realistic helper size goes into every licence and its AAD), gets 32 random bytes of material, a
stated entropy estimate of 128 bits (so the key-strength policy passes as it would for a real unit-binding
source), and a device key drawn at random instead of derived with Argon2id. That is what enrollment stores, and
issuing only reads it, so timing issue with synthesized keys measures exactly what a vendor pays per licence.

Timed: ``issue_license`` for every device (each with its own salt, nonces and HKDF), with and without an Ed25519
signature, for a licence of two AES-GCM groups; then ``open_license`` of one licence with the profile's material
and default Argon2id parameters (the device's cost: one Argon2id run), and with the stored device key.
Writes ``license_issue.json`` to ``--out`` and prints it plus a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import chiplock
from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.license import ContentKeys, issue_license, open_license
from chiplock.profile import DeviceKey, DeviceProfile

TARGET_S = 10.0


def synthesize(n: int, kdf: KdfParams) -> list[DeviceProfile]:
    sram = chiplock.enroll(("sram",), options={"sram": {"simulate": "board-7", "noise": 0.1}},
                           kdf=KdfParams(**INSECURE_FAST))
    helper = sram.enrollments[0].helper
    out = []
    for _ in range(n):
        e = Enrollment(source="sram", helper=helper, material=os.urandom(32), entropy_bits=128.0)
        out.append(DeviceProfile(enrollments=(e,), device_key=DeviceKey(kdf=kdf, key=os.urandom(32))))
    return out


def time_issue(keys: ContentKeys, profiles: list[DeviceProfile], secret: bytes, **kw) -> float:
    start = time.perf_counter()
    for p in profiles:
        issue_license(keys, p, secret=secret, **kw)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    keys = ContentKeys.new({"main": "aes", "head": "shuffle"})
    secret = os.urandom(32)
    t0 = time.perf_counter()
    profiles = synthesize(args.devices, KdfParams())
    synth_s = time.perf_counter() - t0

    unsigned_s = time_issue(keys, profiles, secret)
    signed_s = time_issue(keys, profiles, secret, signing_key=Ed25519PrivateKey.generate())
    silent_keys = ContentKeys.new({"main": "pre-aes"})
    silent_s = time_issue(silent_keys, profiles, secret)

    # The device's side: one licence, opened from the material with default Argon2id (what a device pays),
    # then with the stored key (what a vendor's own check pays).
    p = profiles[0]
    bare = DeviceProfile(enrollments=p.enrollments)
    dk = DeviceKey.derive(bare.materials(), KdfParams())
    p = DeviceProfile(enrollments=p.enrollments, device_key=dk)
    lic = issue_license(keys, p, secret=secret)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        got = open_license(lic, content_id=keys.content_id, transforms=keys.transforms, profile=bare, secret=secret)
        runs.append(time.perf_counter() - start)
    assert got == {k: g.key for k, g in keys.groups.items()}
    start = time.perf_counter()
    open_license(lic, content_id=keys.content_id, transforms=keys.transforms, profile=p, secret=secret)
    open_stored_s = time.perf_counter() - start

    n = args.devices
    result = {
        "devices": n, "groups": len(keys.groups), "helper_chars": len(json.dumps(p.enrollments[0].helper)),
        "synthesize_s": round(synth_s, 3),
        "issue_s": round(unsigned_s, 3), "issue_us_per_licence": round(1e6 * unsigned_s / n, 1),
        "issue_signed_s": round(signed_s, 3), "issue_signed_us_per_licence": round(1e6 * signed_s / n, 1),
        "issue_silent_1group_s": round(silent_s, 3),
        "open_argon2id_default_s": round(statistics.median(runs), 3),
        "open_stored_device_key_ms": round(1e3 * open_stored_s, 3),
        "target_s": TARGET_S, "meets_target": signed_s <= TARGET_S and unsigned_s <= TARGET_S,
        "kdf": {k: v for k, v in KdfParams().to_json().items() if k != "salt"},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)", "chiplock": chiplock.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "license_issue.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"issued {n} licences in {unsigned_s:.2f} s ({result['issue_us_per_licence']} us each; "
          f"{signed_s:.2f} s signed), target <= {TARGET_S:g} s: {'met' if result['meets_target'] else 'MISSED'}; "
          f"opening one on the device: {result['open_argon2id_default_s']} s (Argon2id)")


if __name__ == "__main__":
    main()
