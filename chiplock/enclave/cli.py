"""`chiplock enclave`: partition a model, serve its secure part from a hardened executor, run it, attack it.

``package`` trains a demonstration model for a strategy (a public model on the public half of the data set, the
victim fine-tuned on the private half, or TEESlice's private slices beside the frozen public backbone), splits it
and locks it into one container: group ``main`` for the host, ``enclave`` for the executor
(:mod:`chiplock.enclave.package`); licences come from ``chiplock license issue --group main|enclave``. ``serve``
runs executors on a Unix socket (one hardened executor process per connection); ``run`` evaluates the partitioned
model, starting its own executor or connecting to a served one, and prints what crossed the channel. ``attack``
is the model-stealing harness (``chiplock attack steal``), ``bench`` the overhead measurement.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Confidential inference: a partitioned model whose secure part runs in a hardened "
                  "executor process with its own key (docs/enclave.md).", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)

_STRATEGY_HELP = ("all-out | last-k (DarkneTZ) | first-k (Serdab) | shadownet | teeslice | all-in: what runs in the "
                  "executor.")
_PRESET_HELP = "paper: the settings behind docs/enclave.md (minutes); smoke: a quick check (seconds)."
_LABELS_HELP = ("Answer with the predicted label only, not the logits: exact logits let the host solve a hidden "
                "last layer from d + 1 chosen queries (docs/enclave.md)")
_MODEL_HINT = "pass a model written by `chiplock enclave package`"
_LICENSE_HINT = "issue one with `chiplock license issue MODEL --group main|enclave --profile DEVICE.json -o FILE`"
_SET_HELP = ("Override one setting of the preset, KEY=VALUE with VALUE as JSON (e.g. --set 'queries=[50]'); "
             "repeatable. `--set help=1` lists the settings.")


def _cli():
    """The main CLI's helpers (imported when used: chiplock.cli mounts this app)."""
    import chiplock.cli as main_cli

    return main_cli


@app.command()
def package(
    out: Path = typer.Option(..., "-o", "--out", help="The partitioned, locked model (one container)."),
    strategy: str = typer.Option("teeslice", help=_STRATEGY_HELP),
    k: int = typer.Option(2, help="Units inside the executor for last-k / first-k."),
    data: str = typer.Option("mnist5000", help="Data set: mnist5000 or digits8."),
    epochs: int = typer.Option(5, min=0, help="Epochs of each training stage."),
    seed: int = typer.Option(0, help="Seed of the data split, the training and the disguise."),
    keys_out: Optional[Path] = typer.Option(None, "--keys-out", help="Content keys (default OUT.keys; mode 0600)."),
    host_transform: str = typer.Option("pre-aes", help="The host part's transform (pre-aes, aes, shuffle)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output that is not a container."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON."),
) -> None:
    """Train a demonstration model, partition it with STRATEGY and lock it (group main: host, enclave: executor)."""
    from chiplock.enclave.package import package as package_partition
    from chiplock.enclave.partition import STRATEGIES, split
    from chiplock.enclave.train import (evaluate, finetune_victim, load_splits, net_spec_for, pretrain_public,
                                        train_teeslice)
    from chiplock.errors import UnsupportedConfig

    if strategy not in STRATEGIES:
        raise UnsupportedConfig(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    from chiplock.api import check_keys_path

    keys_out = keys_out or out.with_name(out.name + ".keys")
    _cli().check_output(out, kind="container", force=force)
    check_keys_path(keys_out, out, None, force=force)  # before minutes of training, not after
    splits = load_splits(data, seed=seed)
    spec = net_spec_for(splits)
    with _cli()._progress("package") as bar:
        def stage(name: str):
            return None if bar is None else (lambda done, total: bar(name, done, total))
        public = pretrain_public(spec, splits, epochs=epochs, seed=seed, progress=stage("public model"))
        if strategy == "teeslice":
            model = train_teeslice(public, splits, epochs=epochs, seed=seed, progress=stage("private slices"))
        else:
            model = finetune_victim(public, splits, epochs=epochs, seed=seed, progress=stage("fine-tune"))
    acc = evaluate(model, splits)
    part = split(model, strategy, k=k, seed=seed)
    package_partition(part, out, content_keys_path=keys_out, host_transform=host_transform, force=force)
    n_pub = sum(t.numel() for t in part.public.values())
    n_sec = sum(t.numel() for t in part.secure.values())
    if as_json:
        sys.stdout.write(json.dumps({"out": str(out), "keys": str(keys_out), "strategy": strategy, "data": data,
                                     "accuracy": acc, "public_parameters": n_pub, "secure_parameters": n_sec,
                                     "ops": sorted(part.spec.get("ops", {}))}) + "\n")
    console.print(f"wrote {out} ({strategy}: {n_pub:,} public / {n_sec:,} secure parameters; test accuracy "
                  f"{acc:.3f} on {data}) and {keys_out} (mode 0600: the only way to issue licences)")
    console.print(f"next: chiplock license issue {out} --keys {keys_out} --group main --profile HOST.json -o host.lic"
                  f"\n      chiplock license issue {out} --keys {keys_out} --group enclave --profile "
                  "EXECUTOR.json -o enclave.lic")


@app.command()
def serve(
    model: Path = typer.Argument(..., help="The partitioned model (from `chiplock enclave package`)."),
    license: Path = typer.Option(..., "--license", help="The executor's licence (group enclave)."),
    sock_path: Path = typer.Option(..., "--socket", help="Unix socket to listen on (created mode 0600)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="The executor's vendor secret."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="The executor's profile (default: measure)."),
    budget_mib: float = typer.Option(64.0, help="Secure-memory budget of each executor (MiB)."),
    user: Optional[str] = typer.Option(None, "--user", help="Run each executor as this user (needs root)."),
    harden: bool = typer.Option(True, "--harden/--no-harden", help="Harden the executor (default; --no-harden "
                                "only to debug)."),
    once: bool = typer.Option(False, "--once", help="Serve one connection, then exit."),
    labels_only: bool = typer.Option(False, "--labels-only", help=_LABELS_HELP),
    socket_group: Optional[str] = typer.Option(None, "--socket-group", help="Let this group connect (socket mode "
                                               "0660): the host's group when serve runs as root with --user."),
    max_executors: int = typer.Option(4, min=1, help="Executors alive at once; more connections wait."),
) -> None:
    """Serve the model's secure part on a Unix socket: one hardened executor process per connection.

    Protection from the host needs the executor to run as another user than the host: start serve as root with
    --user (and --socket-group for the host), with the executor's secret and licence readable only by that user.
    """
    import grp

    from chiplock.errors import OutputError

    main_cli = _cli()
    main_cli.check_input(model, "model", _MODEL_HINT)
    main_cli.check_input(license, "licence", _LICENSE_HINT)
    gid = None
    if socket_group is not None:
        try:
            gid = grp.getgrnam(socket_group).gr_gid
        except KeyError:
            raise OutputError(f"--socket-group {socket_group!r} is not a group here; pass an existing group") from None
    if os.path.lexists(sock_path):
        if not sock_path.is_socket():
            raise OutputError(f"{str(sock_path)!r} exists and is not a socket; choose another --socket path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(sock_path))
                live = True
            except OSError:
                live = False
        if live:
            raise OutputError(f"{str(sock_path)!r} is served by a running `chiplock enclave serve`; stop it or "
                              "choose another --socket path")
        sock_path.unlink()  # a stale socket of an earlier serve
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(os.fspath(sock_path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(sock_path, -1, gid)
        os.chmod(sock_path, 0o660)
    ours = os.stat(sock_path).st_ino
    server.listen(8)
    live_procs: list[subprocess.Popen] = []
    from chiplock.enclave.executor import executor_args

    args = executor_args(model, license, secret_file=secret_file, profile=profile, budget_mib=budget_mib,
                         harden=harden, user=user, labels_only=labels_only)
    console.print(f"serving {model} on {sock_path} (one executor per connection; Ctrl-C stops)")
    try:
        while True:
            live_procs = [p for p in live_procs if p.poll() is None]  # reaps the finished ones
            while len(live_procs) >= max_executors:
                live_procs.pop(0).wait()
            conn, _ = server.accept()
            with conn:
                proc = subprocess.Popen([sys.executable, "-m", "chiplock.enclave.executor", "--fd",
                                         str(conn.fileno()), *args], pass_fds=[conn.fileno()],
                                        stdin=subprocess.DEVNULL)
            live_procs.append(proc)
            console.print(f"connection: executor pid {proc.pid}")
            if once:
                proc.wait()
                return
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        try:
            if os.stat(sock_path).st_ino == ours:  # never remove another serve's socket
                sock_path.unlink()
        except FileNotFoundError:
            pass


@app.command()
def run(
    model: Path = typer.Argument(..., help="The partitioned model."),
    license: Path = typer.Option(..., "--license", help="The host's licence (group main)."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="The host's profile (default: measure)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="The host's vendor secret."),
    enclave_license: Optional[Path] = typer.Option(None, "--enclave-license", help="Start an executor with this "
                                                   "licence (group enclave)."),
    enclave_profile: Optional[Path] = typer.Option(None, "--enclave-profile", help="The executor's profile."),
    enclave_secret_file: Optional[Path] = typer.Option(None, "--enclave-secret-file",
                                                       help="The executor's vendor secret (the host never reads it)."),
    connect: Optional[Path] = typer.Option(None, "--connect", help="Use the executor served on this socket."),
    budget_mib: float = typer.Option(64.0, help="Secure-memory budget of a started executor (MiB)."),
    labels_only: bool = typer.Option(False, "--labels-only", help=_LABELS_HELP + " (a started executor)"),
    data: str = typer.Option("mnist5000", help="Evaluate on this data set's test split."),
    batch: int = typer.Option(256, min=1, help="Batch size."),
    seed: int = typer.Option(0, help="The data split's seed (as at packaging)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Run the partitioned model on a test set: accuracy, time, world switches, bytes crossing, hardening."""
    from chiplock.enclave.executor import Enclave
    from chiplock.enclave.package import load_host
    from chiplock.enclave.partition import HostModel
    from chiplock.enclave.train import load_splits
    from chiplock.errors import UnsupportedConfig

    from chiplock.errors import ProfileError
    from chiplock.profile import DeviceProfile

    main_cli = _cli()
    main_cli.check_input(model, "model", _MODEL_HINT)
    main_cli.check_input(license, "licence", _LICENSE_HINT)
    if profile is not None:
        main_cli.check_input(profile, "device profile", "create it on the device with `chiplock enroll -o FILE`",
                             ProfileError)
    spec, public = load_host(model, license, profile=DeviceProfile.load(profile) if profile else None,
                             secret=main_cli._read_secret(secret_file))
    if spec.get("strategy") == "all-out":
        enclave = None
    elif connect is not None:
        enclave = Enclave.connect(connect)
    elif enclave_license is not None:
        enclave = Enclave.start(model, enclave_license, secret_file=enclave_secret_file, profile=enclave_profile,
                                budget_mib=budget_mib, labels_only=labels_only)
    else:
        raise UnsupportedConfig("this model has a secure part: pass --enclave-license (start an executor) or "
                                "--connect SOCKET (a served one)")
    try:
        host = HostModel(spec, public, enclave if enclave is not None else _no_enclave)
        splits = load_splits(data, seed=seed)
        x, y = splits.test_x, splits.test_y
        correct, start = 0, time.perf_counter()
        for i in range(0, len(y), batch):
            correct += int((host(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {"strategy": spec.get("strategy"), "images": len(y), "accuracy": correct / len(y),
                                  "seconds": seconds, "batch": batch}
        if enclave is not None:
            status = enclave.status()
            result.update(switches=enclave.switches, bytes_in=enclave.bytes_in, bytes_out=enclave.bytes_out,
                          executor=status)
    finally:
        if enclave is not None:
            enclave.close()
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    table = Table(title=f"{model.name}: {result['strategy']} on {data} (test split)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("accuracy", f"{result['accuracy']:.4f} ({correct}/{len(y)})")
    table.add_row("time", f"{seconds * 1000 / max(1, -(-len(y) // batch)):.1f} ms per batch of {batch}")
    if enclave is not None:
        table.add_row("world switches", f"{result['switches']:,}")
        table.add_row("bytes in / out", f"{result['bytes_in']:,} / {result['bytes_out']:,}")
        for key, value in _flatten(result["executor"]).items():
            table.add_row(f"executor {key}", str(value))
    out_console.print(table)


def _no_enclave(op: str, inputs: list) -> list:
    from chiplock.errors import EnclaveError

    raise EnclaveError(f"op {op!r} needs the executor, but this model was packaged all-out")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


@app.command()
def attack(preset: str = typer.Option("paper", help=_PRESET_HELP),
           set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
           out: Path = typer.Option(Path("attack-results"), "-o", "--out", help="Folder for the outputs."),
           as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
           threads: int = typer.Option(1, min=1, help="Torch threads.")) -> None:
    """Model stealing per strategy (TEESlice protocol) and ShadowNet filter matching (= `chiplock attack steal`)."""
    from chiplock.attacks.cli import run_and_print

    run_and_print("steal", preset=preset, sets=set_, out=out, as_json=as_json, threads=threads)


@app.command()
def bench(preset: str = typer.Option("paper", help=_PRESET_HELP),
          set_: Optional[List[str]] = typer.Option(None, "--set", help=_SET_HELP),
          out: Path = typer.Option(Path("bench/results/enclave"), "-o", "--out", help="Folder for the outputs."),
          as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
          threads: int = typer.Option(1, min=1, help="Torch threads.")) -> None:
    """Latency and throughput of each strategy through the real executor vs the plain model."""
    from chiplock.attacks.cli import run_and_print
    from chiplock.enclave import overhead

    run_and_print("overhead", preset=preset, sets=set_, out=out, as_json=as_json, threads=threads, mod=overhead)
