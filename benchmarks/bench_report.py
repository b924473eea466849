"""Markdown rendering and derived numbers (linearity, stage shares) for the unlock benchmark."""

from __future__ import annotations

import statistics
from typing import Any

#: Time per GB may vary this much between sizes (max / min) and still count as linear.
LINEAR_TOLERANCE = 1.3
_STAGES = ("map", "read", "digest", "keys", "aes", "plan", "decode")
#: What the decode time beyond AES / permutation building is, per transform.
_REST = {"aes": "writing the output (page faults)", "shuffle": "applying the permutations",
         "pre-aes": "the compiled code-to-value mapping"}


def linearity(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Seconds per GB of plaintext at each size, per transform and for the baseline (all its runs pooled)."""
    series: dict[str, dict[str, float]] = {}
    pooled: dict[str, list[float]] = {}
    for r in rows:
        series.setdefault(r["transform"], {})[r["size"]] = r["unlock_s_per_gb"]
        gb = r["weights"]["bytes"] / 1e9
        pooled.setdefault(r["size"], []).extend(t / gb for t in r["baseline_samples_s"])
    series["baseline"] = {size: statistics.median(v) for size, v in pooled.items()}
    out = {}
    for name, per_size in series.items():
        spread = max(per_size.values()) / min(per_size.values())
        out[name] = {"s_per_gb": per_size, "max_over_min": spread, "linear": spread <= LINEAR_TOLERANCE}
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _notes(result: dict[str, Any]) -> list[str]:
    """Data-driven lines: where the unlock time goes at the profiled size, and what bounds the baseline."""
    rows, prims = result["results"], result["primitives_gb_s"]
    if not rows or not result["stages_s"]:
        return []
    size = list(result["stages_s"])[-1]
    stages = result["stages_s"][size]
    notes = []
    for r in (x for x in rows if x["size"] == size):
        s = stages[r["transform"]]
        u, stored = r["unlock_s"], r["container_bytes"]
        both = s["digest"] + s["decode"]
        parts = [f"digest {s['digest']:.2f} s ({s['digest'] / both:.0%} of digest+decode; "
                 f"{stored / s['digest'] / 1e9:.2f} GB/s of stored bytes)",
                 f"decode {s['decode']:.2f} s ({s['decode'] / both:.0%})"]
        if "aes" in s:
            parts.append(f"of which AES-CTR {s['aes']:.2f} s ({stored / s['aes'] / 1e9:.1f} GB/s) and "
                         f"{s['decode'] - s['aes']:.2f} s the rest of the decode")
        if "plan" in s:
            parts.append(f"of which building the permutations {s['plan']:.2f} s and "
                         f"{s['decode'] - s['plan']:.2f} s applying them")
        rest = s["decode"] - s.get("aes", 0.0) - s.get("plan", 0.0)
        parts_by_cost = {"the BLAKE3 integrity digest": s["digest"], "AES-CTR": s.get("aes", 0.0),
                         "building the keyed permutations": s.get("plan", 0.0), _REST[r["transform"]]: rest}
        worst = max(parts_by_cost, key=parts_by_cost.get)
        notes.append(f"- **{r['transform']}**, limited by {worst}. At {size}: unlock {u:.2f} s vs baseline "
                     f"{r['baseline_s']:.2f} s; "
                     + "; ".join(parts) + f"; header+keys {s['map'] + s['keys']:.3f} s. Container "
                     f"{stored / r['weights']['bytes']:.0f}x the plaintext; a read-only pass over it "
                     f"takes {s['read']:.3f} s, so reading the mapped file is not the limit.")
    base = next(r for r in rows if r["size"] == size)
    notes.append(f"- **baseline** at {size}: {base['baseline_s']:.3f} s ({base['baseline_gb_s']:.2f} GB/s): one "
                 f"copy from the mapped file into fresh memory, bound by page faults (copy into fresh memory "
                 f"{prims['copy_fresh']:.1f} GB/s, into mapped memory {prims['copy_warm']:.1f} GB/s). One core "
                 f"does AES-256-CTR at {prims['aes_ctr_1core']:.1f} GB/s and BLAKE3 at "
                 f"{prims['blake3_1core']:.1f} GB/s (SHA-256: {prims['sha256_1core']:.1f}; chiplock's pool: "
                 f"{prims['aes_ctr_pool']:.1f} and "
                 f"{prims['tree_digest_pool']:.1f} GB/s), so any transform that hashes every stored byte "
                 f"before decoding pays about {1 / prims['tree_digest_pool']:.2f} s per stored GB for it.")
    lat = result["small_op_latency_ms"]
    notes.append(f"- A 256 K-element float64->float32 conversion took {lat['torch_to_float32_ms']:.2f} ms in torch "
                 f"(default threads) vs {lat['numpy_astype_float32_ms']:.2f} ms in numpy; pre-aes decode does "
                 "one per 256 K elements inside its worker threads.")
    return notes


def markdown(result: dict[str, Any]) -> str:
    m, fixed = result["machine"], result["fixed"]
    load = result["load_average"]
    out = [f"# chiplock unlock benchmark ({result['date']})", "",
           f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags'])}); torch {m['torch']} "
           f"({m['torch_threads']} threads), numpy {m['numpy']}, safetensors {m['safetensors']}, "
           f"cryptography {m['cryptography']}, Python {m['python']}. Load average {load['start'][0]:.1f} at the "
           f"start, {load['end'][0]:.1f} at the end (the machine is shared).", "",
           "Method: page cache warm, one warm-up round, then per repetition and transform one unlock run paired "
           "with one baseline run (order alternating, heap trimmed before each run); times are medians, "
           "**ratio** is the median of the per-pair ratios. Baseline: `safetensors.torch.load_file` + `clone()` "
           "of every tensor. Containers use the insecure-fast KDF; the fixed key cost is measured apart.", "",
           "## Unlock time vs plain safetensors load", ""]
    rows = []
    for r in result["results"]:
        rows.append([r["size"], r["transform"], str(r["weights"]["tensors"]), f"{r['container_bytes'] / 1e6:.0f}",
                     str(r["repeat"]), f"{r['unlock_s']:.3f}", f"{r['baseline_s']:.3f}", f"{r['unlock_gb_s']:.2f}",
                     f"{r['baseline_gb_s']:.2f}", f"**{r['ratio']:.2f}x**", f"<= {r['target_ratio']:g}x",
                     "pass" if r["pass"] else "**miss**", f"{r['device_total_s']:.2f}"])
    out.append(_table(["size", "transform", "tensors", "file MB", "runs", "unlock s", "baseline s", "unlock GB/s",
                       "baseline GB/s", "ratio", "target", "result", "on-device total s"], rows))
    out += ["", "GB/s are of plaintext (fp32). pre-aes stores a 64-bit code per fp32 element, so its file is twice "
            "the plaintext. *On-device total* = unlock (per-byte work) + the fixed key cost below.", "",
            "## Fixed key-derivation cost (once per unlock, independent of size)", ""]
    a = fixed["argon2id_default"]
    out.append(_table(["step", "median s"], [
        [f"Argon2id, default KdfParams (t={a['iterations']}, lanes={a['lanes']}, {a['memory_kib'] // 1024} MiB)",
         f"{a['median_s']:.3f}"],
        ["reproduce the precision fingerprint", f"{fixed['precision_reproduce']['median_s']:.3f}"],
        ["**total fixed**", f"**{fixed['total_s']:.3f}**"],
        ["(Argon2id with the insecure-fast parameters used in the timings above)",
         f"{fixed['argon2id_insecure_fast_s']:.5f}"]]))
    out += ["", "## Linearity: seconds per GB of plaintext", ""]
    sizes = list(dict.fromkeys(r["size"] for r in result["results"]))
    lin = [[name] + [f"{v['s_per_gb'].get(s, float('nan')):.3f}" for s in sizes]
           + [f"{v['max_over_min']:.2f}", "yes" if v["linear"] else "**no**"]
           for name, v in result["linearity"].items()]
    out.append(_table(["series", *sizes, "max/min", f"linear (max/min <= {LINEAR_TOLERANCE})"], lin))
    out += ["", "## Stage profile (each stage alone over the whole container, median s)", "",
            "Stages are timed separately from the table above, so on a busy machine digest+decode need not add "
            "up to the unlock time exactly; read them as shares.", ""]
    st_rows = []
    for size, per_tf in result["stages_s"].items():
        unlock = {r["transform"]: r["unlock_s"] for r in result["results"] if r["size"] == size}
        for name, s in per_tf.items():
            st_rows.append([size, name] + [f"{s[k]:.3f}" if k in s else "-" for k in _STAGES]
                           + [f"{s['digest'] + s['decode']:.3f}", f"{unlock[name]:.3f}"])
    out.append(_table(["size", "transform", "map", "read", "digest", "keys", "AES alone", "shuffle plan", "decode",
                       "digest+decode", "unlock"], st_rows))
    out += ["", "## Primitive throughput on this machine (best of 3, 256 MiB buffer, GB/s)", ""]
    out.append(_table(["primitive", "GB/s"], [[k, f"{v:.2f}"] for k, v in result["primitives_gb_s"].items()]))
    out += ["", "## What limits it", "", *_notes(result), ""]
    return "\n".join(out)
