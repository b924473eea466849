"""`chiplock neuronlock`: lock-train a model to a hardware-bound neuron password, evaluate it, attack it.

``train`` trains the original, ranks its neurons, draws the model's content keys (one ``neuronlock`` key of the
silent kind, :mod:`chiplock.neuronlock.keys`), derives the password from that key and lock-trains the model; it
writes the locked model (public: weights, statistics, spec) and the keys file (mode 0600, the vendor's secret).
``issue`` wraps the key for one device; ``eval`` re-derives the password from the keys file (vendor) or from a
licence on this device, and prints the accuracy with that password, without one and with wrong ones. ``attack``
runs :mod:`chiplock.neuronlock.attacks` with a preset and ``--set`` overrides, as ``chiplock attack`` does.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from chiplock.neuronlock.password import PasswordSpec
from chiplock.neuronlock.train import NeuronLockConfig

app = typer.Typer(help="Neuron authorization locks (EdgePro): a secret password on a few neurons, derived from "
                  "the device's licence.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)

_MODEL_HINT = "pass a model written by `chiplock neuronlock train`"
_KEYS_HINT = "pass the keys file `chiplock neuronlock train` wrote (by default MODEL.keys)"
_ENROLL_HINT = "create it on the device with `chiplock enroll -o FILE`"
_PRESET_HELP = "paper: the settings behind docs/neuronlock.md (minutes); smoke: a quick check (seconds)."
#: The lock options' defaults come from the configs, so the CLI and the library agree.
_LOCK = {f.name: f.default for f in fields(NeuronLockConfig)}
_SPEC = {f.name: f.default for f in fields(PasswordSpec)}
_SET_HELP = ("Override one setting of the preset, KEY=VALUE with VALUE as JSON (e.g. --set 'archs=[\"smallcnn\"]' "
             "--set gamma=0.2); repeatable. `--set help=1` lists the settings.")


def _cli():
    """The main CLI's helpers (imported when used: chiplock.cli mounts this app)."""
    import chiplock.cli as main_cli

    return main_cli


def _config(gamma: float, pool: float, **lock: Any) -> NeuronLockConfig:
    """The lock configuration, or a one-line UnsupportedConfig before any training starts."""
    from chiplock.errors import UnsupportedConfig

    try:
        return NeuronLockConfig(spec=PasswordSpec(gamma=gamma, pool=max(pool, gamma)), **lock)
    except ValueError as exc:
        raise UnsupportedConfig(f"{exc}; see `chiplock neuronlock train --help`") from None


def _check_keys_out(keys_path: Path, out: Path, force: bool) -> None:
    """The keys are the only way to issue licences: never the model file, never over another model's keys."""
    from chiplock._io import check_output
    from chiplock.errors import ChiplockError, OutputError
    from chiplock.license import ContentKeys

    if os.path.realpath(keys_path) == os.path.realpath(out):
        raise OutputError(f"the keys path {str(keys_path)!r} is the model's output; keep them apart (e.g. "
                          "--keys-out OUT.keys)")
    check_output(keys_path, kind="file", inputs=[out])
    if os.path.lexists(keys_path):
        try:
            ContentKeys.load(keys_path)
            holds_keys = True
        except ChiplockError:
            holds_keys = False
        if holds_keys:
            raise OutputError(f"{str(keys_path)!r} holds the content keys of another model (the only way to issue "
                              "licences for it); choose another --keys-out, or delete it yourself if that model is "
                              "gone")
        if not force:
            raise OutputError(f"{str(keys_path)!r} already exists; choose another --keys-out or pass --force")


@app.command()
def train(
    out: Path = typer.Option(Path("neuronlocked.safetensors"), "-o", "--out", help="Locked model (safetensors)."),
    keys_out: Optional[Path] = typer.Option(None, "--keys-out", help="Content keys (default OUT.keys; mode 0600, "
                                            "keep them secret: they unlock the model anywhere)."),
    data: str = typer.Option("mnist5000", help="mnist5000 (28x28) or digits8 (8x8)."),
    arch: str = typer.Option("smallcnn", help="smallcnn, resnet18 or gpt (MLP neurons)."),
    width: int = typer.Option(16, min=1, help="First-stage channels (the hidden size for gpt)."),
    pretrain_epochs: int = typer.Option(3, min=0, help="Epochs for the original."),
    lock_epochs: int = typer.Option(_LOCK["epochs"], min=0, help="Epochs of lock training."),
    gamma: float = typer.Option(_SPEC["gamma"], help="Fraction of each layer's neurons that carry the password "
                                "(EdgePro 0.1)."),
    pool: float = typer.Option(_SPEC["pool"], help="Authorization neurons are drawn from this top fraction by "
                               "importance (at least gamma)."),
    mode: str = typer.Option(_LOCK["mode"], help="mixed (authorized + unauthorized pass per batch) or alternate "
                             "(EdgePro's locking / releasing steps)."),
    unauth_weight: float = typer.Option(_LOCK["unauth_weight"], help="Weight of the unauthorized loss."),
    wrong_fraction: float = typer.Option(_LOCK["wrong_fraction"], help="Fraction of the unauthorized pass run "
                                         "under wrong passwords (random keys) instead of none; 0 is EdgePro's."),
    lr: float = typer.Option(_LOCK["lr"], help="Adam learning rate of lock training."),
    batch_size: int = typer.Option(_LOCK["batch_size"], min=1, help="Batch size."),
    calib: int = typer.Option(512, min=1, help="Training images the neurons are ranked on."),
    max_train: Optional[int] = typer.Option(None, min=1, help="Use only the first N training images."),
    seed: int = typer.Option(_LOCK["seed"], help="Seeds the original's initialisation and both trainings."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --keys-out that holds no keys."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train the original, derive a password from fresh content keys, lock-train; write the model and its keys."""
    import torch

    from chiplock._io import check_output
    from chiplock.neuronlock.keys import new_keys, password_key_from_keys
    from chiplock.neuronlock.model_io import save_model
    from chiplock.neuronlock.password import derive_password, rank_neurons
    from chiplock.neuronlock.train import evaluate, lock_train
    from chiplock.softlock.model_io import build_architecture
    from chiplock.softlock.pipeline import load_dataset
    from chiplock_demo.training import train_classifier

    # Every check that can fail runs before any training.
    cfg = _config(gamma, pool, epochs=lock_epochs, lr=lr, batch_size=batch_size, unauth_weight=unauth_weight,
                  mode=mode, wrong_fraction=wrong_fraction, seed=seed)
    keys_path = keys_out or out.with_name(out.name + ".keys")
    check_output(out, kind="file")
    _check_keys_out(keys_path, out, force)
    ds = load_dataset(data)
    torch.manual_seed(seed)
    model = build_architecture(arch, num_classes=ds.num_classes, image_size=ds.image_size, width=width)
    x, y = ds.x_train, ds.y_train
    if max_train is not None:
        x, y = x[:max_train], y[:max_train]
    with _cli()._progress("neuronlock") as update:
        def stage(name: str):
            return None if update is None else (lambda done, total: update(name, done, total))

        train_classifier(model, x, y, epochs=pretrain_epochs, seed=seed, progress=stage("pretrain"))
        original = evaluate(model, ds.x_test, ds.y_test)
        stats = rank_neurons(model, x[:calib])
        keys = new_keys()
        password = derive_password(password_key_from_keys(keys), stats, cfg.spec)
        result = lock_train(model, x, y, password, cfg, stats=stats, progress=stage("lock"))
    summary = {"original": original, "authorized": evaluate(model, ds.x_test, ds.y_test, password),
               "natural": evaluate(model, ds.x_test, ds.y_test), "chance": 1 / ds.num_classes,
               "locked_layers": len(stats), "authorization_neurons": sum(len(lp.neurons) for lp in password.layers),
               "lock_seconds": result.seconds}
    arch_info = {"name": arch, "num_classes": ds.num_classes, "image_size": ds.image_size, "width": width}
    extra = {"content_id": keys.content_id.hex(), "data": data, "accuracy": {k: summary[k] for k in
                                                                             ("original", "authorized", "natural")},
             "train": {"pretrain_epochs": pretrain_epochs, "lock_epochs": lock_epochs, "mode": cfg.mode,
                       "unauth_weight": unauth_weight, "wrong_fraction": wrong_fraction, "lr": lr,
                       "batch_size": batch_size, "calib": calib, "max_train": max_train, "seed": seed}}
    # The keys first: a model whose keys were lost could never be licensed; stray keys harm nothing.
    keys.save(keys_path)
    save_model(model, out, arch=arch_info, stats=stats, spec=cfg.spec, extra=extra)
    summary |= {"model": str(out), "keys": str(keys_path)}
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    console.print(f"original {original:.3f}; locked: authorized {summary['authorized']:.3f}, natural "
                  f"{summary['natural']:.3f} (chance {summary['chance']:.3f}); {summary['authorization_neurons']} "
                  f"authorization neurons in {len(stats)} layers")
    console.print(f"wrote locked model [bold]{out}[/] and content keys [bold]{keys_path}[/] (mode 0600; keep them "
                  f"secret). Licence a device: chiplock neuronlock issue {out} --profile DEVICE.json -o DEVICE.lic")


def _load(path: Path):
    from chiplock._io import check_input
    from chiplock.neuronlock.model_io import load_model

    check_input(path, "neuron-locked model", _MODEL_HINT)
    return load_model(path)


def _content_id(info: Any) -> Optional[bytes]:
    cid = info.extra.get("content_id")
    if isinstance(cid, str) and len(cid) == 32:
        try:
            return bytes.fromhex(cid)
        except ValueError:
            return None
    return None


def _load_keys(path: Path, model: Path, info: Any):
    from chiplock._io import check_input
    from chiplock.errors import KeyFileError
    from chiplock.license import ContentKeys
    from chiplock.neuronlock.keys import check_keys

    check_input(path, "content keys file", _KEYS_HINT, KeyFileError)
    keys = check_keys(ContentKeys.load(path))
    cid = _content_id(info)
    if cid is not None and cid != keys.content_id:
        raise KeyFileError(f"{str(path)!r} holds the keys of another model than {str(model)!r}; {_KEYS_HINT}")
    return keys


@app.command()
def issue(
    model: Path = typer.Argument(..., help="Locked model written by `chiplock neuronlock train`."),
    profile: Path = typer.Option(..., "--profile", help="The device's profile (from `chiplock enroll`)."),
    out: Path = typer.Option(..., "-o", "--out", help="The licence file (public)."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="The content keys (default MODEL.keys)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret (raw bytes)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM) to sign it."),
    allow_weak_key: bool = typer.Option(False, "--allow-weak-key",
                                        help="Issue even if the key rests on too little entropy."),
    force: bool = typer.Option(False, "--force", help="Replace an existing licence file."),
) -> None:
    """Wrap MODEL's password key for one device (AES-CTR: a wrong device derives a wrong password, no error)."""
    from chiplock._io import check_input, check_output
    from chiplock.errors import OutputError, ProfileError
    from chiplock.neuronlock.keys import issue as issue_licence
    from chiplock.profile import DeviceProfile

    main = _cli()
    _, info = _load(model)
    keys_path = keys or model.with_name(model.name + ".keys")
    content = _load_keys(keys_path, model, info)
    check_input(profile, "device profile", _ENROLL_HINT, ProfileError)
    check_output(out, kind="file", inputs=[model, keys_path, profile])
    if out.exists() and not force:
        raise OutputError(f"{str(out)!r} already exists; pass --force to replace it")
    secret = main._read_secret(secret_file)
    sign = main._load_signing_key(signing_key) if signing_key is not None else None
    lic = issue_licence(content, DeviceProfile.load(profile), secret=secret, signing_key=sign,
                        allow_weak_key=allow_weak_key)
    lic.save(out)
    console.print(f"licence for [bold]{profile}[/] -> {out}; on the device: chiplock neuronlock eval {model} "
                  f"--license {out}")


@app.command("eval")
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Locked model written by `chiplock neuronlock train`."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="Vendor side: the content keys file."),
    license: Optional[Path] = typer.Option(None, "--license", help="Device side: this device's licence (from "
                                           "`chiplock neuronlock issue`)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="With --license: open it as this profile's "
                                           "device would (default: measure this device)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="With --license: the vendor secret."),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="With --license: the vendor's Ed25519 "
                                              "public key (PEM); require a valid signature."),
    wrong_keys: int = typer.Option(5, min=0, help="Random keys whose (wrong) passwords are evaluated too."),
    data: Optional[str] = typer.Option(None, help="Data set (default: the one the model was trained on)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Accuracy of MODEL with the password of --keys or --license, without a password, and with wrong ones."""
    from chiplock._io import check_input
    from chiplock.errors import ProfileError, UnsupportedConfig
    from chiplock.license import License
    from chiplock.neuronlock.keys import password_key, password_key_from_keys
    from chiplock.neuronlock.password import derive_password
    from chiplock.neuronlock.train import evaluate
    from chiplock.profile import DeviceProfile
    from chiplock.softlock.pipeline import load_dataset

    if (keys is None) == (license is None):
        raise UnsupportedConfig("pass exactly one of --keys (the vendor's content keys) or --license (this "
                                "device's licence)")
    if keys is not None and any(o is not None for o in (profile, secret_file, verify_key)):
        raise UnsupportedConfig("--profile, --secret-file and --verify-key go with --license, not --keys")
    main = _cli()
    net, info = _load(model)
    if keys is not None:
        key, source = password_key_from_keys(_load_keys(keys, model, info)), "keys file"
    else:
        check_input(license, "licence file", "pass the licence `chiplock neuronlock issue` wrote for this device")
        if profile is not None:
            check_input(profile, "device profile", _ENROLL_HINT, ProfileError)
        lic = License.load(license)
        secret = main._read_secret(secret_file)
        pub = main._load_verify_key(verify_key) if verify_key is not None else None
        prof = DeviceProfile.load(profile) if profile is not None else None
        with console.status("opening the licence..."):
            key = password_key(lic, content_id=_content_id(info), profile=prof, secret=secret, verify_key=pub)
        source = "licence"
    name = data or info.extra.get("data")
    if not isinstance(name, str):
        raise UnsupportedConfig(f"{model} does not record its data set; pass --data mnist5000 or --data digits8")
    ds = load_dataset(name)
    if ds.image_size != info.arch["image_size"]:
        raise UnsupportedConfig(f"data set {name} has {ds.image_size}x{ds.image_size} images but the model takes "
                                f"{info.arch['image_size']}x{info.arch['image_size']}; pass the data set it was "
                                "trained on")
    with console.status("evaluating..."):
        acc = evaluate(net, ds.x_test, ds.y_test, derive_password(key, info.stats, info.spec))
        natural = evaluate(net, ds.x_test, ds.y_test)
        wrong = [evaluate(net, ds.x_test, ds.y_test, derive_password(os.urandom(32), info.stats, info.spec))
                 for _ in range(wrong_keys)]
    report = {"model": str(model), "data": name, "key_from": source, "accuracy": acc, "natural": natural,
              "wrong_password_mean": sum(wrong) / len(wrong) if wrong else None,
              "wrong_password_max": max(wrong) if wrong else None, "wrong_passwords": len(wrong),
              "chance": 1 / info.arch["num_classes"], "original": info.extra.get("accuracy", {}).get("original")}
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(title=f"{model.name} on {name} (password from the {source})")
    table.add_column("password")
    table.add_column("accuracy", justify="right")

    def cell(v: Optional[float]) -> str:
        return "—" if v is None else f"{v:.3f}"

    table.add_row(f"from the {source} (authorized on the right device)", cell(acc))
    table.add_row("none (natural activations)", cell(natural))
    table.add_row(f"wrong: mean / max of {len(wrong)} random keys", f"{cell(report['wrong_password_mean'])} / "
                  f"{cell(report['wrong_password_max'])}")
    table.add_row("chance", cell(report["chance"]))
    if report["original"] is not None:
        table.add_row("original, before locking (recorded at training)", cell(report["original"]))
    out_console.print(table)


@app.command()
def attack(
    preset: str = typer.Option("paper", help=_PRESET_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
    out: Path = typer.Option(Path("attack-results"), "-o", "--out", help="Folder for neuronlock.json/.md/.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    threads: int = typer.Option(1, min=1, help="Torch threads."),
) -> None:
    """Fine-tuning, pruning, password search, folding, neuron finding, wrong-password detection (own models)."""
    import torch

    from chiplock._io import check_output_folder
    from chiplock.attacks.cli import parse_sets
    from chiplock.errors import UnsupportedConfig
    from chiplock.neuronlock import attacks

    overrides = parse_sets(set_)
    if overrides.pop("help", None) is not None:
        presets = attacks.PRESETS
        raise UnsupportedConfig("neuronlock attack takes: " + "; ".join(
            f"{k} (paper {presets['paper'][k]!r}, smoke {presets['smoke'][k]!r})" for k in presets["paper"]))
    check_output_folder(out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _cli()._progress("neuronlock attack") as bar:
            result = attacks.run(preset=preset, progress=bar, **overrides)
    finally:
        torch.set_num_threads(before)
    result.save(out)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), default=str) + "\n")
    else:
        out_console.print(Markdown(result.to_markdown()))
        console.print(f"wrote {out / (result.name + '.md')} (and .json{', .png' if result.plot else ''})")
