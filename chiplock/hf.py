"""Hugging Face integration: lock a ``save_pretrained`` folder, load a locked folder as a transformers model.

``lock_pretrained`` needs only chiplock; ``from_pretrained`` needs ``transformers`` (``pip install chiplock[hf]``),
imported on first use.

Example:
    >>> import chiplock.hf
    >>> model.save_pretrained("tiny")  # doctest: +SKIP
    >>> chiplock.hf.lock_pretrained("tiny", "tiny-locked", profile, secret=vendor_secret)  # doctest: +SKIP
    >>> model = chiplock.hf.from_pretrained("tiny-locked", secret=vendor_secret)  # on the device  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import chiplock
from chiplock.api import load_state_dict
from chiplock.container.shards import locked_dir_shards
from chiplock.errors import ContainerError, UnsupportedConfig

if TYPE_CHECKING:
    from chiplock.license import License
    from chiplock.profile import DeviceProfile

__all__ = ["from_pretrained", "lock_pretrained"]

#: How many names an error about missing or unexpected tensors shows.
_SHOW = 5


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnsupportedConfig("loading a locked model into transformers needs the transformers package: "
                                "pip install chiplock[hf]") from None
    return transformers


def lock_pretrained(src_dir: str | os.PathLike, out_dir: str | os.PathLike, profile: DeviceProfile | None = None,
                    **lock_kwargs: Any) -> dict[str, Any]:
    """Lock a Hugging Face model folder (as ``save_pretrained`` writes it) into a new locked folder.

    Each ``X.safetensors`` shard becomes ``X.chiplock``; ``model.chiplock.index.json`` replaces the safetensors
    index; ``config.json``, tokenizer and other side files are copied verbatim; pickle weights are never copied.
    The output folder appears only complete.

    Args:
        src_dir: The model folder, or its ``model.safetensors.index.json``.
        out_dir: The folder to create (its parent must exist).
        profile: The device's :class:`~chiplock.DeviceProfile` (its licence goes in every shard), or ``None``
            with ``content_keys_path=`` (issue licences later).
        **lock_kwargs: As :func:`chiplock.lock` (``transform``, ``config``, ``secret``, ``kdf``, ``signing_key``,
            ``allow_weak_key``, ``content_keys_path``, ``force`` (replace a non-empty ``out_dir``), ``workers``
            (shards locked at once), ``progress``).

    Returns:
        The folder's public metadata, as :func:`chiplock.inspect` returns it.

    Raises:
        As :func:`chiplock.lock` and :func:`chiplock.container.shards.lock_dir` (``OutputError`` for an output
        folder that is the input, inside it, or not empty without ``force``; ``ContainerError`` for a malformed
        index; ``UnsupportedConfig`` for a folder without safetensors).

    Example:
        >>> chiplock.hf.lock_pretrained("tiny", "tiny-locked", content_keys_path="tiny.keys")  # doctest: +SKIP
    """
    # chiplock.lock takes folders (through chiplock.container.shards.lock_dir); this verb names the use case.
    return chiplock.lock(src_dir, out_dir, profile, **lock_kwargs)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no random init); buffers stay real.

    Buffers that are not saved (rotary ``inv_freq``, attention masks) are computed in ``__init__`` and never come
    from the checkpoint, so they must be built for real. This patches ``nn.Module.register_parameter`` for the
    block (as accelerate's ``init_empty_weights(include_buffers=False)`` does): not thread-safe.
    """
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _empty_model(transformers: Any, config: Any, model_class: Any, dtype: torch.dtype | None) -> torch.nn.Module:
    cls = model_class if model_class is not None else transformers.AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    no_init = getattr(getattr(transformers, "initialization", None), "no_init_weights", None)
    with _parameters_on_meta(), (no_init() if no_init is not None else contextlib.nullcontext()):
        try:
            if hasattr(cls, "from_config"):
                return cls.from_config(config, **kwargs)
            if hasattr(cls, "_from_config"):
                return cls._from_config(config, **kwargs)
            return cls(config)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnsupportedConfig(f"transformers cannot build {getattr(cls, '__name__', cls)} from this "
                                    f"config.json ({type(exc).__name__}: {str(exc)[:200]}); pass the right "
                                    "model_class, or upgrade transformers") from None


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(repr(k) for k in sorted(keys)[:_SHOW]) + more


def from_pretrained(locked_dir: str | os.PathLike, model_class: Any = None, *, profile: DeviceProfile | None = None,
                    secret: bytes | None = None, license: License | str | os.PathLike | None = None,
                    device: str | torch.device | None = None,
                    torch_dtype: torch.dtype | None = None, **unlock_kwargs: Any) -> torch.nn.Module:
    """Build a transformers model from a locked folder, unlocking its weights shard by shard on this device.

    The model is built from the folder's ``config.json`` with its parameters on the meta device (no random
    init, no memory), then each shard is unlocked and its tensors become the model's parameters; tied weights
    are re-tied. Nothing plaintext is written to disk.

    Args:
        locked_dir: A folder written by :func:`lock_pretrained` (or its ``model.chiplock.index.json``).
        model_class: The class to build (``AutoModelForCausalLM`` by default): anything with ``from_config``,
            a ``PreTrainedModel`` subclass, or a class called as ``model_class(config)``.
        profile: Unlock as the device of this profile would; ``None`` (normal) measures this device.
        secret: The vendor secret, if the folder was locked with one.
        license: A licence for this device (content-locked folders).
        device: Where the model goes (``"cuda"``, ...); each tensor moves there as it is unlocked.
        torch_dtype: Build the model in this dtype (weights are cast to it); default: ``config.json``'s dtype,
            as transformers' ``from_config`` does.
        **unlock_kwargs: Passed to :func:`chiplock.api.load_state_dict` (``verify_key``, ``max_kdf_memory_kib``,
            ``groups``, ...).

    Returns:
        The model, in eval mode, on ``device``.

    Raises:
        UnsupportedConfig: transformers is missing (``pip install chiplock[hf]``) or cannot build the model.
        ContainerError: The folder is not a locked model folder, lacks ``config.json``, or its tensors do not
            match the model's (missing or unexpected names, wrong shapes).
        InvalidKey, InvalidTag, ProfileError, ...: As :func:`chiplock.unlock`.

    Example:
        >>> model = chiplock.hf.from_pretrained("llama-locked", secret=vendor_secret, device="cuda")  # doctest: +SKIP
    """
    transformers = _transformers()
    ld = locked_dir_shards(locked_dir)
    if unlock_kwargs.get("verify_key") is not None:
        # config.json decides what the weights load into: with the vendor's key, the signed index (side files'
        # digests included) is checked before anything is read from the folder.
        from chiplock.api import verify_folder

        verify_folder(ld.folder, unlock_kwargs["verify_key"])
    if not (ld.folder / "config.json").is_file():
        raise ContainerError(f"the locked folder {str(ld.folder)!r} has no config.json; lock the folder that "
                             "save_pretrained wrote (its config.json is copied)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(ld.folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedConfig(f"transformers cannot read {str(ld.folder / 'config.json')!r} "
                                f"({type(exc).__name__}: {str(exc)[:200]}); upgrade transformers or fix the "
                                "config") from None
    model = _empty_model(transformers, config, model_class, torch_dtype)
    expected = model.state_dict(keep_vars=True)
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]

    def unexpected(names: Any) -> list[str]:
        return [n for n in names if n not in expected and not any(p.search(n) for p in ignored)]

    # The public index names every tensor: refuse a folder for another model before any key work.
    def refuse_unexpected(names: Any) -> None:
        extra = unexpected(names)
        if extra:
            raise ContainerError(f"the locked folder holds tensors this {type(model).__name__} does not have: "
                                 f"{_names(extra)}; pass the right model_class or check config.json")

    refuse_unexpected(ld.weight_map)
    # One pass over the folder: the licence is opened once, and each tensor replaces its meta parameter as it
    # is unlocked (cast to the model's dtype), so memory holds the model plus one tensor.
    missed, extra = load_state_dict(model, ld.folder, profile, secret, strict=False, device=device,
                                    license=license, **unlock_kwargs)
    refuse_unexpected(extra)
    _tie(model, set(missed))
    buffers = {n for n, _ in model.named_buffers()}
    now = model.state_dict(keep_vars=True)
    missing = [n for n in missed if n in now and (n in buffers or now[n].is_meta)]
    if missing:
        raise ContainerError(f"the locked folder lacks weights this {type(model).__name__} needs: {_names(missing)}; "
                             "lock the complete model folder, or pass the right model_class")
    _load_generation_config(transformers, model, ld.folder)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _tie(model: torch.nn.Module, missing: set[str]) -> None:
    tie = getattr(model, "tie_weights", None)
    if tie is None:
        return
    try:
        tie(missing_keys=missing)  # transformers 5: ties towards whichever of a pair was loaded.
    except TypeError:
        tie()


def _load_generation_config(transformers: Any, model: Any, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ContainerError(f"generation_config.json in {str(folder)!r} is unreadable ({type(exc).__name__}); "
                             "restore it from the original model folder") from None
