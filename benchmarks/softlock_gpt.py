"""A small GPT-style transformer soft-locked FP16 -> Int8 (issue #10 item 5).

A causal Llama-style decoder (random configuration, :mod:`chiplock_demo.models.gpt`) reads each MNIST image as 28
rows of 28 pixels and classifies from the last row. It is pretrained on MNIST-5000, lock-trained with
:func:`chiplock.softlock.train.lock_train` (authorized FP16, unauthorized Int8) in three variants: ``decoys``
(decoy cancellation in the gated MLPs and attention value/output pairs, the default lock), ``plain`` (L_lock
alone) and ``outliers`` (function-preserving outlier channels), evaluated on each configuration, and attacked
with every deployment recipe of :mod:`chiplock.softlock.deploy` that fits a transformer (including the
transformer rewrite ``transformer-equalise``) against Int8 and, optionally, with the retraining attack.

Writes ``<out>/softlock_gpt.json`` and ``<out>/softlock_gpt.md`` (and caches the pretrained original). Not
collected by pytest. Example (a few minutes on one core of a 2-core CPU):

    .venv/bin/python benchmarks/softlock_gpt.py --out bench/results/softlock-gpt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from chiplock.softlock.config import SoftLockConfig
from chiplock.softlock.model_io import build_architecture, load_model, save_model
from chiplock.softlock.train import evaluate_configs, lock_train
from chiplock_demo.data import load_mnist5000
from chiplock_demo.training import train_classifier

CONFIGS = ["fp32", "fp16", "int8", "int8-per_tensor"]


def _machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if cpuinfo.exists() else platform.processor()
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_avg_start": os.getloadavg()}


def _pretrain(out: Path, arch: dict, data, epochs: int, lr: float, seed: int) -> tuple[torch.nn.Module, float]:
    path = out / f"original_gpt_w{arch['width']}_e{epochs}.safetensors"
    if path.exists():
        model, info = load_model(path)
        return model, float(info.get("seconds", 0.0))
    torch.manual_seed(seed)
    model = build_architecture(arch["name"], num_classes=arch["num_classes"], image_size=arch["image_size"],
                               width=arch["width"])
    t0 = time.perf_counter()
    train_classifier(model, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed)
    seconds = time.perf_counter() - t0
    save_model(model, path, {"arch": arch, "epochs": epochs, "lr": lr, "seconds": seconds})
    return model.eval(), seconds


# --------------------------------------------------------------------------- lever and its standard undoing

@torch.no_grad()
def plant_outliers(model, log2_k: int = 10):
    """Function-preserving outlier channels at the input of every linear layer but the embedding.

    An RMSNorm gain is multiplied by ``k = 2**log2_k`` on one channel and the matching input column of the next
    linear layers divided by ``k``; a value row (``v_proj``, ``up_proj``) is multiplied by ``k`` and the matching
    column of the layer it feeds (``o_proj``, ``down_proj``; the attention and the gated product are linear in
    it) divided by ``k``. FP16 carries the outlier; an Int8 deployment with one activation scale per example
    rounds every other channel of that input to zero, and per-channel weight scales round the shrunk column away.
    """
    k = 2.0 ** log2_k
    width = model.head.in_features
    for i, layer in enumerate(model.body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        c = (5 * i + 1) % width
        layer.input_layernorm.weight[c] *= k
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[:, c] /= k
        layer.post_attention_layernorm.weight[(c + 2) % width] *= k
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[:, (c + 2) % width] /= k
        attn.v_proj.weight[(c + 3) % width] *= k
        attn.o_proj.weight[:, (c + 3) % width] /= k
        j = (c + 7) % mlp.up_proj.out_features
        mlp.up_proj.weight[j] *= k
        mlp.down_proj.weight[:, j] /= k
    model.body.norm.weight[0] *= k
    model.head.weight[:, 0] /= k
    return model


def _attack(locked, data, n_calib: int) -> dict:
    from chiplock.softlock.deploy import attack_table

    # attack_table records a recipe whose tool fails on this model (and runs the others).
    table = attack_table(locked, "int8", data.x_train[:n_calib], data.x_test, data.y_test,
                         on_row=lambda r: print(f"  attack {r.recipe}: {r.accuracy:.3f} ({r.seconds:.1f} s)",
                                                flush=True))
    best, best_any = table.best(), table.best(standard_only=False)
    return {**table.to_dict(), "best_standard": {"recipe": best.recipe, "accuracy": best.accuracy},
            "best_any": {"recipe": best_any.recipe, "accuracy": best_any.accuracy}}


def _retrain(locked, arch: dict, data, fractions, epochs: int) -> dict:
    try:
        from chiplock.softlock.retrain import retrain_attack

        def build():
            return build_architecture(arch["name"], num_classes=arch["num_classes"], image_size=arch["image_size"],
                                      width=arch["width"])

        res = retrain_attack(locked, "int8", data.x_train, data.y_train, data.x_test, data.y_test,
                             fractions=fractions, epochs=epochs, authorized="fp16", build=build)
        return res.to_dict()
    except Exception as e:
        traceback.print_exc()
        return {"error": f"retrain_attack failed: {e!r}"}


def _variant_md(name: str, v: dict, o: dict) -> list[str]:
    lk = v["locked"]["accuracy"]
    c = v["lock"]["config"]
    lines = [f"## Variant `{name}`: {v['description']}", "",
             "| Model | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS),
             "| original | " + " | ".join(f"{o[k]:.3f}" for k in CONFIGS) + " |",
             "| locked | " + " | ".join(f"{lk[k]:.3f}" for k in CONFIGS) + " |", "",
             f"Lock training: {c['epochs']} epochs (lambda {c['lam']}, lr {c['lr']}, hinge {c['hinge']}), "
             f"{v['lock']['seconds']:.0f} s. **Δorig = {v['delta_orig']:+.3f}, Δlock naive = "
             f"{v['delta_lock_naive']:.3f}, Δlock after the best standard recipe = {v['delta_lock_best']:.3f}**.", ""]
    att = v.get("attack", {})
    if att.get("rows"):
        lines += ["Deployment attack against Int8 (256 unlabelled calibration images):", "",
                  "| Recipe | Runs on | Accuracy | Seconds | Standard |", "|---|---|---|---|---|"]
        lines += [f"| {r['recipe']} | {r['config']} | {r['accuracy']:.3f} | {r['seconds']:.2f} | "
                  f"{'yes' if r['standard'] else 'no'} |" for r in att["rows"]]
        lines += ["", f"Best standard recipe: {att['best_standard']['recipe']} -> "
                      f"{att['best_standard']['accuracy']:.3f}.", ""]
    for f in att.get("failed", []):
        lines += [f"- recipe `{f['recipe']}` failed on this model: {f['error']}"]
    rt = v.get("retrain")
    if rt and "rows" in rt:
        lines += ["", f"Retraining attack (fine-tune in {rt['config']} with the straight-through estimator, Adam lr "
                      f"{rt['settings']['lr']}, {rt['settings']['epochs']} epochs) vs training from scratch in "
                      f"{rt['config']} (lr {rt['settings']['scratch_lr']}, same data, epochs, batch size):", "",
                  "| Fraction | Samples | Steps | Int8 after retraining | From scratch | FP16 after retraining | "
                  "Retrain s | Scratch s |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['fraction']} | {r['samples']} | {r['steps']} | {r['unauthorized_accuracy']:.3f} | "
                  f"{r['scratch_accuracy']:.3f} | {r['authorized_accuracy']:.3f} | {r['retrain_seconds']:.1f} | "
                  f"{r['scratch_seconds']:.1f} |" for r in rt["rows"]]
    elif rt:
        lines += ["", f"Retraining attack: {rt.get('error')}"]
    return lines + [""]


def _markdown(res: dict) -> str:
    o = res["original"]["accuracy"]
    m = res["machine"]
    lines = ["# GPT-style transformer soft-locked FP16 -> Int8", "",
             f"Model: causal Llama-style decoder (`chiplock_demo.models.gpt`), {res['arch']['width']} hidden, "
             f"2 layers, 4 heads, {res['parameters']} parameters, random config; MNIST-5000 read as 28 rows of 28 "
             "pixels (4000 train / 1000 test), last-token head.",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared), {m['threads']} thread; torch {m['torch']}, "
             f"transformers {m['transformers']}; load average {m['load_avg_start'][0]:.1f} at start.",
             f"Pretraining: {res['original']['epochs']} epochs, lr {res['original']['lr']}, "
             f"{res['original']['seconds']:.0f} s. Command: `{res['command']}`.", ""]
    for name, v in res["variants"].items():
        lines += _variant_md(name, v, o)
    lines += ["## Verdict", ""] + [f"- {t}" for t in res["verdict"]] + [""] + _notes(res) + [""]
    return "\n".join(lines)


def _notes(res: dict) -> list[str]:
    """What the numbers mean (written from the results, so a rerun states its own numbers)."""
    out = ["## Notes", ""]
    v = res["variants"]
    if "plain" in v:
        acc = v["plain"]["locked"]["accuracy"]
        out.append(f"- `plain`: L_lock without a lever cannot separate FP16 from Int8 on this model: the two compute "
                   f"almost the same function and the straight-through estimator gives both losses the same "
                   f"gradient, so training raises both together (fp16 {acc['fp16']:.3f}, int8 {acc['int8']:.3f}; "
                   "at lr 1e-3 the same happens, see run-lock-lr1e-3.log: 0.459 / 0.461).")
    if "outliers" in v:
        att = v["outliers"]["attack"]
        lib = [r for r in att.get("rows", []) if r["standard"] and "transformer-equalise" not in r["recipe"]]
        eq = [r for r in att.get("rows", []) if "transformer-equalise" in r["recipe"] and r["standard"]]
        if lib and eq:
            out.append(f"- `outliers`: the planted channels hold against every recipe of chiplock.softlock.deploy "
                       f"(best {max(r['accuracy'] for r in lib):.3f}; those recipes target conv/BatchNorm "
                       f"networks) but fall to the transformer's own standard rewrite, folding the RMSNorm gains "
                       f"into the next linear layers and equalising v/o and up/down per channel "
                       f"({max(r['accuracy'] for r in eq):.3f} in {min(r['seconds'] for r in eq):.2f} s): it is a "
                       "function-preserving reparametrisation, the weak point issue #10 describes.")
        rt = v["outliers"].get("retrain", {})
        if rt.get("rows"):
            r = rt["rows"][-1]
            out.append(f"- Retraining: fine-tuning the planted model in Int8 recovers little "
                       f"({r['unauthorized_accuracy']:.3f} with {r['fraction']:.0%} of the data vs {r['scratch_accuracy']:.3f} from scratch), because "
                       "Adam moves the 2^-10 columns by about lr per step and wrecks the model; it is moot, since "
                       "the training-free rewrite above already recovers the original accuracy.")
    if any(v_.get("attack", {}).get("failed") for v_ in v.values()):
        out.append("- Recipes with `bias-correction` fail on this model: the step reads channels on dimension 1, "
                   "but a linear layer on a (batch, tokens, features) input has them on the last dimension.")
    return out


VARIANTS = {
    "decoys": ("decoy cancellation (chiplock.softlock.decoys) in the gated MLPs and the attention value/output "
               "pairs, then lock training with the decoys frozen", "decoys"),
    "plain": ("L_lock alone (levers none): the paper's loss with a straight-through estimator", None),
    "outliers": ("function-preserving outlier channels (x2^10) at every linear input but the embedding, then "
                 "L_lock", plant_outliers),
}


def _run_variant(name: str, out: Path, orig_path: Path, arch: dict, data, before: dict, args) -> dict:
    description, plant = VARIANTS[name]
    locked, _ = load_model(orig_path)
    levers = "none"
    if plant == "decoys":
        levers, plant = "decoys", None  # planted by lock_train, which freezes them
    elif plant is not None:
        plant(locked)
    # Adam moves every weight by about lr whatever its size, so it wrecks the planted 2**-10 columns within an
    # epoch at lr 1e-3 (fp16 accuracy fell from 0.944 to 0.284 in 3 epochs): the planted variant is not
    # lock-trained further by default.
    epochs, lr = (args.epochs, args.lr) if plant is None else (args.planted_epochs, args.planted_lr)
    cfg = SoftLockConfig(authorized="fp16", unauthorized=("int8",), lam=args.lam, epochs=epochs, lr=lr,
                         levers=levers, seed=args.seed)
    print(f"[{name}] planted:", evaluate_configs(locked, data.x_test, data.y_test, ["fp32", "fp16", "int8"]),
          flush=True)
    lock = lock_train(locked, data.x_train, data.y_train, cfg,
                      on_epoch=lambda e, r: print(f"  [{name}] lock epoch {e}: {r}", flush=True))
    after = evaluate_configs(lock.model, data.x_test, data.y_test, CONFIGS)
    print(f"[{name}] locked", after, flush=True)
    save_model(lock.model, out / f"locked_gpt_fp16_int8_{name}.safetensors",
               {"arch": arch, "lock": cfg.to_json(), "variant": name})
    v = {"description": description, "lock": {"config": json.loads(cfg.to_json()), "seconds": lock.seconds,
                                              "history": lock.history},
         "locked": {"accuracy": after}, "delta_orig": before["fp16"] - after["fp16"],
         "delta_lock_naive": after["fp16"] - after["int8"]}
    v["attack"] = _attack(lock.model, data, args.calib)
    best = v["attack"].get("best_standard", {}).get("accuracy", after["int8"])
    v["delta_lock_best"] = after["fp16"] - max(best, after["int8"])
    v["meets_target"] = v["delta_orig"] <= 0.02 and v["delta_lock_best"] >= 0.7
    if args.retrain and name in args.retrain_variants.split(","):
        fractions = tuple(float(f) for f in args.retrain.split(","))
        v["retrain"] = _retrain(lock.model, arch, data, fractions, args.retrain_epochs)
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/softlock-gpt")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--variants", default="decoys,plain,outliers", help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--planted-epochs", type=int, default=0, help="lock-training epochs after planting outliers")
    p.add_argument("--planted-lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--retrain", default="0.01,0.1,1.0", help="data fractions for the retraining attack ('' skips)")
    p.add_argument("--retrain-variants", default="decoys,outliers")
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_mnist5000(seed=0)
    arch = {"name": "gpt", "num_classes": 10, "image_size": 28, "width": args.width}
    res: dict = {"arch": arch, "machine": _machine(), "command": " ".join(sys.argv), "variants": {}}

    original, pre_s = _pretrain(out, arch, data, args.pretrain_epochs, args.pretrain_lr, args.seed)
    orig_path = out / f"original_gpt_w{args.width}_e{args.pretrain_epochs}.safetensors"
    res["parameters"] = sum(p.numel() for p in original.parameters())
    before = evaluate_configs(original, data.x_test, data.y_test, CONFIGS)
    res["original"] = {"accuracy": before, "epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "seconds": pre_s}
    print("original", before, f"({pre_s:.0f} s)", flush=True)
    res["verdict"] = []
    for name in args.variants.split(","):
        v = res["variants"][name] = _run_variant(name, out, orig_path, arch, data, before, args)
        res["verdict"].append(
            f"{name}: {'meets' if v['meets_target'] else 'does not meet'} the target (Δorig {v['delta_orig']:+.3f}, "
            f"Δlock after the best standard recipe {v['delta_lock_best']:.3f}, best: "
            f"{v['attack'].get('best_standard', {}).get('recipe', 'naive cast')}).")
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["meets_target"] = any(v["meets_target"] for v in res["variants"].values())
    (out / "softlock_gpt.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "softlock_gpt.md").write_text(_markdown(res))
    print("\n".join(res["verdict"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
