"""The `chiplock` command line: parses arguments and calls the public verbs.

Every error ends the command with exit code 2 and exactly one line on stderr, ``error: <what to do>``: chiplock's
own errors, OS errors (mapped to :class:`~chiplock.errors.FileAccessError`) and usage errors alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from chiplock._io import check_input, check_output, os_error, read_capped
from chiplock.attacks.cli import app as attack_app
from chiplock.enclave.cli import app as enclave_app
from chiplock.errors import (ChiplockError, ContainerError, FileAccessError, KeyFileError, OutputError,
                             ProfileError)
from chiplock.fingerprint import available_sources
from chiplock.fingerprint.cli import app as fingerprint_app
from chiplock.neuronlock.cli import app as neuronlock_app
from chiplock.registry import choices_enum, load_plugins
from chiplock.softlock.cli import app as softlock_app
from chiplock.split.cli import app as split_app
from chiplock.transforms import available_transforms

load_plugins()
#: The --transform choices: every registered transform, plug-ins included (docs/extending.md).
Transform = choices_enum("Transform", available_transforms())


app = typer.Typer(help="Lock machine-learning models to the hardware they are licensed for.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# soft_wrap: rich would otherwise wrap long messages (paths) at 80 columns when stderr is not a terminal.
console = Console(stderr=True, soft_wrap=True)

_ENROLL_HINT = "create it on the device with `chiplock enroll -o FILE`"
_SIGNING_HINT = "pass the vendor's Ed25519 private key in PEM, made with `openssl genpkey -algorithm ed25519 -out KEY`"
_VERIFY_HINT = "pass the vendor's Ed25519 public key in PEM, made with `openssl pkey -in KEY -pubout -out PUB`"

# Sub-command groups owned by other packages mount here, one line each.
app.add_typer(fingerprint_app, name="fingerprint")
app.add_typer(softlock_app, name="softlock")
app.add_typer(neuronlock_app, name="neuronlock")
app.add_typer(attack_app, name="attack")
app.add_typer(enclave_app, name="enclave")
app.add_typer(split_app, name="split")


@app.command()
def enroll(out: Path = typer.Option(..., "-o", "--out", help="Where to write the device profile (JSON, secret)."),
           source: list[str] = typer.Option(["precision"], "--source",
                                             help=f"Fingerprint source ({', '.join(available_sources())}); "
                                                  "repeatable."),
           force: bool = typer.Option(False, "--force", help="Replace an existing file at --out.")) -> None:
    """Measure this device and write its profile (the vendor keeps it secret)."""
    from chiplock.profile import enroll as _enroll

    check_output(out, kind="file")
    # A profile may hold the only copy of a device's key (a TPM-sealed blob, an SRAM enrollment): never replace
    # an existing file, whatever it holds, without --force.
    if not force and out.exists():
        raise OutputError(f"{str(out)!r} already exists; choose another path or pass --force to replace it")
    with console.status("measuring fingerprints..."):
        profile = _enroll(source)
    profile.save(out)
    console.print(f"wrote device profile [bold]{out}[/] (sources: {', '.join(profile.sources)}); keep it secret")


#: Secret and key files are small; a larger (or endless: /dev/zero) input is refused instead of read whole.
_MAX_SMALL_INPUT = 1 << 20


def _read_input(path: Path, what: str, hint: str, error: type[ChiplockError] = FileAccessError) -> bytes:
    check_input(path, what, hint, error)
    try:
        data = read_capped(path, _MAX_SMALL_INPUT)  # A FIFO or pipe works; a folder or socket is refused.
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise error(f"{what} {str(path)!r} is not a file; {hint}") from None
        raise os_error(exc, path, "read") from None
    if len(data) > _MAX_SMALL_INPUT:
        raise error(f"{what} {str(path)!r} is larger than {_MAX_SMALL_INPUT >> 20} MiB; {hint}")
    return data


def _read_secret(secret_file: Optional[Path]) -> Optional[bytes]:
    if secret_file is None:
        return None
    return _read_input(secret_file, "secret file", "pass the file that holds the vendor secret (raw bytes)")


def _key_kind(key: object) -> str:
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.replace(suffix, "")
    return {"EllipticCurve": "EC", "": "unknown"}.get(name, name)


def _load_signing_key(path: Path):
    """The vendor's Ed25519 private key from a PEM file, or a one-line :class:`KeyFileError`."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_input(path, "signing key file", _SIGNING_HINT, KeyFileError)
    where = repr(str(path))
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"signing key {where} is password-protected; write an unencrypted copy with "
                           "`openssl pkey -in KEY -out PLAIN.pem` and pass that") from None
    except (ValueError, UnsupportedAlgorithm):
        if b"PUBLIC KEY-----" in data:  # PEM armour of a public key (SPKI or PKCS#1).
            raise KeyFileError(f"signing key {where} is a public key; --signing-key needs the vendor's private "
                               "key (the public one goes to devices as --verify-key)") from None
        raise KeyFileError(f"signing key {where} is not a PEM private key; {_SIGNING_HINT}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"signing key {where} is an {_key_kind(key)} key; chiplock signs with Ed25519 only: "
                           f"{_SIGNING_HINT}")
    return key


def _load_verify_key(path: Path):
    """The vendor's Ed25519 public key from a PEM file, or a one-line :class:`KeyFileError`."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_input(path, "verification key file", _VERIFY_HINT, KeyFileError)
    where = repr(str(path))
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY-----" in data:  # PEM armour of any private key, encrypted or not.
            raise KeyFileError(f"verification key {where} is a private key; pass the public key instead "
                               "(`openssl pkey -in KEY -pubout -out PUB`) and keep the private key off devices") \
                from None
        raise KeyFileError(f"verification key {where} is not a PEM public key; {_VERIFY_HINT}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"verification key {where} is an {_key_kind(key)} key; chiplock verifies Ed25519 "
                           f"signatures only: {_VERIFY_HINT}")
    return key


@contextlib.contextmanager
def _progress(label: str) -> Iterator:
    """A rich progress bar fed by the verbs' ``progress(stage, done, total)`` callback (only on a terminal:
    elsewhere rich would leave blank lines on stderr)."""
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
            bar.update(tasks[stage], completed=done)

        yield update


@app.command("lock")
def lock_cmd(model: Path = typer.Argument(..., help="Weights: .safetensors, a .pt/.bin state dict, or a Hugging "
                                                    "Face folder of *.safetensors shards."),
             out: Path = typer.Option(..., "-o", "--out", help="Container (or folder, for a folder) to write."),
             profile: Optional[Path] = typer.Option(None, "--profile",
                                                    help="Device profile from `chiplock enroll`: embed that "
                                                         "device's licence. Without it the content keys go to "
                                                         "--keys-out and `chiplock license issue` makes licences."),
             transform: Transform = typer.Option("pre-aes", "--transform", help="Parameter transform."),
             group: list[str] = typer.Option([], "--group",
                                             help="LABEL=TRANSFORM:PATTERN[,PATTERN...]: tensors matching a "
                                                  "pattern get their own key and transform; repeatable."),
             keys_out: Optional[Path] = typer.Option(None, "--keys-out",
                                                     help="Where to write the content keys without --profile "
                                                          "(default OUT.keys; keep it secret)."),
             secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret (raw bytes)."),
             signing_key: Optional[Path] = typer.Option(None, "--signing-key",
                                                        help="Ed25519 private key (PEM) to sign the file."),
             workers: int = typer.Option(1, "--workers", min=1, help="Shards locked at once (folders)."),
             allow_weak_key: bool = typer.Option(False, "--allow-weak-key",
                                                 help="Lock even if the key rests on too little entropy."),
             force: bool = typer.Option(False, "--force",
                                        help="Replace an existing OUT that is not a chiplock container."),
             as_json: bool = typer.Option(False, "--json", help="Print the public metadata as JSON.")) -> None:
    """Lock MODEL and write a container: for one device (--profile), or once for licences (no --profile)."""
    from chiplock.api import lock
    from chiplock.config import LockConfig
    from chiplock.profile import DeviceProfile

    if not model.is_dir():
        check_input(model, "model file", "check the path (a .safetensors file, a .pt/.bin state dict or a folder)",
                    ContainerError)
    if profile is not None:
        check_input(profile, "device profile", _ENROLL_HINT, ProfileError)
    config = LockConfig(transform=transform.value, groups=tuple(_parse_group(g) for g in group))
    secret = _read_secret(secret_file)
    key = _load_signing_key(signing_key) if signing_key is not None else None
    prof = DeviceProfile.load(profile) if profile is not None else None
    keys_path = None
    if prof is None:
        keys_path = keys_out or out.with_name(out.name + ".keys")
        if secret is not None:
            raise ProfileError("--secret-file goes with a device's licence: pass it to `chiplock license issue` "
                               "(or lock with --profile)")
    inputs = [p for p in (model, profile, secret_file, signing_key) if p is not None]
    if not model.is_dir():
        # Before any key derivation: OUT may not be an input file or a plaintext model (without --force).
        check_output(out, kind="container", force=force, inputs=inputs)
    if keys_path is not None:
        # lock() keeps the keys-file rules (not the output, not in a model folder, never over another model's
        # keys); only the CLI knows the profile, secret and key files, which the keys must not replace either.
        check_output(keys_path, kind="file", inputs=inputs + [out])
    with _progress("lock") as update:
        info = lock(model, out, prof, secret=secret, config=config, signing_key=key, allow_weak_key=allow_weak_key,
                    force=force, content_keys_path=keys_path, workers=workers, progress=update)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console.print(f"locked {len(info['tensors'])} tensors with [bold]{info['transform']}[/] -> {out} "
                  f"({info['total_bytes'] / 1e6:.2f} MB)")
    if keys_path is not None:
        console.print(f"content keys -> [bold]{keys_path}[/] (mode 0600; keep them as secret as the model). Issue a "
                      f"licence per device: chiplock license issue {out} --profile DEVICE.json -o DEVICE.lic")


def _parse_group(spec: str):
    from chiplock.config import GroupConfig

    label, _, rest = spec.partition("=")
    tname, _, patterns = rest.partition(":")
    if not (label and tname and patterns):
        raise typer.BadParameter(f"--group {spec!r} is not LABEL=TRANSFORM:PATTERN[,PATTERN...], e.g. "
                                 "--group head=aes:lm_head.*")
    try:
        return GroupConfig(label, tname, tuple(p for p in patterns.split(",") if p))
    except ValueError as exc:
        raise typer.BadParameter(f"--group {spec!r}: {exc}") from None


@app.command("unlock")
def unlock_cmd(container: Path = typer.Argument(..., help="A chiplock container, or a folder of them."),
               out: Optional[Path] = typer.Option(None, "-o", "--out",
                                                  help="Write the unlocked weights here (.safetensors, or a folder "
                                                       "for a folder), one tensor at a time. Without it nothing is "
                                                       "written."),
               license: Optional[Path] = typer.Option(None, "--license",
                                                      help="This device's licence (from `chiplock license issue`), "
                                                           "for a file locked without --profile."),
               profile: Optional[Path] = typer.Option(None, "--profile",
                                                      help="Unlock as this profile's device would "
                                                           "(default: measure this device)."),
               group: list[str] = typer.Option([], "--group", help="Unlock only this group; repeatable."),
               secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret."),
               verify_key: Optional[Path] = typer.Option(None, "--verify-key",
                                                         help="Vendor's Ed25519 public key (PEM): require a "
                                                              "valid signature."),
               force: bool = typer.Option(False, "--force",
                                          help="Let -o replace an existing file that is not a safetensors file "
                                               "(never a chiplock container)."),
               as_json: bool = typer.Option(False, "--json", help="Print a JSON summary.")) -> None:
    """Unlock CONTAINER on this device; write plaintext weights only with -o."""
    from chiplock.api import iter_unlock, unlock_to_file
    from chiplock.license import License
    from chiplock.profile import DeviceProfile

    if not container.is_dir():
        check_input(container, "container", "check the path", ContainerError)
    if profile is not None:
        check_input(profile, "device profile", _ENROLL_HINT, ProfileError)
    lic = License.load(license) if license is not None else None
    secret = _read_secret(secret_file)
    pub = _load_verify_key(verify_key) if verify_key is not None else None
    if out is not None and not container.is_dir():
        # Before any key derivation: never overwrite the container, a model of another kind, or the input.
        check_output(out, kind="weights", force=force,
                     inputs=[p for p in (container, profile, secret_file, verify_key, license) if p is not None])
    prof = DeviceProfile.load(profile) if profile is not None else None
    kw = dict(license=lic, verify_key=pub, groups=group or None)
    with _progress("unlock") as update:
        if out is not None:
            unlock_to_file(container, out, prof, secret, force=force, progress=update, **kw)
            from chiplock.api import inspect

            info = inspect(container)
            n, params = len(info["tensors"]), sum(_numel(t["shape"]) for t in info["tensors"].values())
        else:
            n = params = 0
            for _, t in iter_unlock(container, prof, secret, progress=update, **kw):
                n, params = n + 1, params + t.numel()
    summary = {"tensors": n, "parameters": params, "written": str(out) if out else None}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(f"unlocked {summary['tensors']} tensors ({summary['parameters']:,} parameters)"
                      + (f" -> {out}" if out else " in memory (nothing written; pass -o to write)"))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


license_app = typer.Typer(help="Per-device licences for a model locked once (without --profile).",
                          no_args_is_help=True)
app.add_typer(license_app, name="license")


@license_app.command("issue")
def license_issue_cmd(container: Path = typer.Argument(..., help="The locked model (file or folder)."),
                      profile: list[Path] = typer.Option(..., "--profile",
                                                         help="Device profile(s); repeatable (one licence each)."),
                      out: Path = typer.Option(..., "-o", "--out",
                                               help="The licence file; with several --profile, a folder that "
                                                    "gets one PROFILE-NAME.lic per device."),
                      keys: Optional[Path] = typer.Option(None, "--keys",
                                                          help="The content keys (default CONTAINER.keys)."),
                      group: list[str] = typer.Option([], "--group", help="Wrap only this group; repeatable."),
                      secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Vendor secret."),
                      signing_key: Optional[Path] = typer.Option(None, "--signing-key",
                                                                 help="Ed25519 private key (PEM) to sign it."),
                      allow_weak_key: bool = typer.Option(False, "--allow-weak-key",
                                                          help="Issue even if the key rests on too little "
                                                               "entropy."),
                      force: bool = typer.Option(False, "--force", help="Replace existing licence files.")) -> None:
    """Wrap a locked model's content keys for one device per --profile (microseconds each)."""
    from chiplock.api import inspect
    from chiplock.license import ContentKeys, issue_license
    from chiplock.profile import DeviceProfile

    keys_path = keys or container.with_name(container.name.rstrip("/") + ".keys")
    check_input(keys_path, "content keys file", "pass the OUT.keys file `chiplock lock` wrote (--keys FILE)",
                KeyFileError)
    content = ContentKeys.load(keys_path)
    info = inspect(container)
    if info["content_id"] != content.content_id.hex():
        raise KeyFileError(f"{str(keys_path)!r} holds the keys of another model than {str(container)!r}; pass the "
                           "keys file written when this model was locked")
    secret = _read_secret(secret_file)
    sign = _load_signing_key(signing_key) if signing_key is not None else None
    many = len(profile) > 1
    if many and not out.is_dir():
        raise OutputError(f"with several --profile, -o must be an existing folder ({str(out)!r} is not)")
    targets = [(p, out / (p.stem + ".lic") if many else out) for p in profile]
    for p, target in targets:
        check_input(p, "device profile", _ENROLL_HINT, ProfileError)
        check_output(target, kind="file", inputs=[container, keys_path, p])
        if target.exists() and not force:
            raise OutputError(f"{str(target)!r} already exists; pass --force to replace it")
    for p, target in targets:
        lic = issue_license(content, DeviceProfile.load(p), secret=secret, groups=group or None,
                            signing_key=sign, allow_weak_key=allow_weak_key)
        lic.save(target)
        console.print(f"licence for [bold]{p}[/] -> {target} (groups {', '.join(lic.groups)})")


@app.command("inspect")
def inspect_cmd(container: Path = typer.Argument(..., help="A chiplock container, or a folder of them."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show a container's public metadata (needs no key)."""
    from chiplock.api import inspect

    if not container.is_dir():
        check_input(container, "container", "check the path", ContainerError)
    info = inspect(container)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    out = Console()
    sources = ", ".join(info["sources"]) or "-"
    out.print(f"[bold]{container}[/]: chiplock v{info['version']}, transform [bold]{info['transform']}[/], "
              f"licence {info['license']}, sources {sources}, "
              f"vendor secret {'required' if info['secret_required'] else 'no'}, "
              f"{'signed' if info['signed'] else 'unsigned'}"
              + (f", {len(info['shards'])} shards" if info.get("shards") else ""))
    table = Table("tensor", "group", "dtype", "shape")
    for name, t in info["tensors"].items():
        table.add_row(name, t["group"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar")
    out.print(table)
    out.print(f"wrong key: {info['wrong_key']}")


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("chiplock-report"), "--out", help="Report folder.")) -> None:
    """Lock a real MNIST model to this machine, show what another machine gets, write a report."""
    # The demo ships beside chiplock (package chiplock_demo); its plotting and data packages are the `demo` extra,
    # which run_demo checks before any work.
    from chiplock_demo.demo import run_demo

    with console.status("demo") as status:
        report = run_demo(out, say=console.print, step=lambda s: (console.print(f"- {s}"), status.update(s)))
    from rich.markdown import Markdown

    Console().print(Markdown(report.read_text()))
    Console().print(f"report written to [bold]{report}[/]")


def _error(message: str) -> None:
    """One line on stderr, never wrapped, whatever the terminal: ``error: <message>``."""
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Errors print one line on stderr and return 2: chiplock errors, OS errors (as :class:`FileAccessError`),
    and usage errors (unknown option, missing argument, bad value).
    """
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover - typer versions that use click itself.
        from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        rv = app(args=None if argv is None else list(argv), prog_name="chiplock", standalone_mode=False)
    except ChiplockError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:
        _error(str(os_error(exc, exc.filename)))
        return 2
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.format_message() + "\n")
        return 2
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "chiplock"
        _error(f"{exc.format_message().rstrip('.')}; see `{where} --help`")
        return 2
    except ClickException as exc:
        _error(exc.format_message())
        return 2
    except typer.Abort:
        _error("aborted")
        return 2
    if isinstance(rv, int) and rv == 130:
        _error("interrupted; no partial output was left")
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """Console-script entry point: every error is one line on stderr and exit code 2."""
    import warnings

    warnings.formatwarning = lambda message, category, *args, **kw: "warning: " + " ".join(str(message).split()) \
        + "\n"
    sys.exit(run())
