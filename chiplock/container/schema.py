"""The container metadata, in one place: one dataclass builds it, validates it and presents it (spec: spec.md).

A container (version 3) holds tensors stored under *groups*: a group is a key label with one transform and its own
random content key. The content keys reach a device through a *licence* (:mod:`chiplock.license`), either
embedded in the header (the single-file mode) or shipped apart (one small file per device). Nothing here needs a
key: :meth:`Metadata.from_json` checks every field's type and size, and cross-checks the stored entries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from chiplock import _json
from chiplock._dtypes import STORED_DTYPES
from chiplock._json import canonical as _canonical
from chiplock._json import is_hex
from chiplock._json import show as _show
from chiplock.errors import ContainerError, InvalidTag, UnsupportedConfig

FORMAT_NAME = "chiplock"
FORMAT_VERSION = 3
#: Caps the reader enforces (see spec.md): a header of 100 MiB holds a model of 100,000 tensors many times over.
MAX_HEADER = 100 << 20
MAX_ELEMENTS = 1 << 48
MAX_DIMS = 64
MAX_NAME_BYTES = 1024
MAX_GROUPS = 64
MAX_PARAMS = 32
MAX_PARAM_CHARS = 1 << 20
MAX_PARAM_LIST = 1 << 16
MAX_SHARDS = 100_000
#: JSON caps for the header (and, counted in the same bytes, the metadata string inside it).
HEADER_LIMITS = _json.Limits(max_bytes=MAX_HEADER, max_depth=64, max_containers=2_000_000, max_items=3_000_000)

_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TENSOR_FIELDS = frozenset({"group", "dtype", "shape", "params", "digest"})
_GROUP_FIELDS = frozenset({"transform", "mac"})
_REQUIRED = frozenset({"format", "version", "content_id", "groups", "tensors", "header_digest"})
_OPTIONAL = frozenset({"created_by", "license", "shard", "signature"})
#: Fields the header digest and signature leave out (they are computed over the rest).
_SELF_CHECKS = ("header_digest", "signature")


def fail(why: str) -> ContainerError:
    """The one error for a file that breaks a rule of spec.md."""
    return ContainerError(f"{why}; this is not an intact chiplock container (re-download it, or lock the model "
                          "again with `chiplock lock`)")


def is_signature(sig: object) -> bool:
    """Whether ``sig`` has the shape of a signature field (a container's or a licence's):
    ``{"alg": "ed25519", "public_key": <32 bytes of lowercase hex>, "sig": <64 bytes of lowercase hex>}``."""
    return (isinstance(sig, dict) and set(sig) == {"alg", "public_key", "sig"} and sig["alg"] == "ed25519"
            and is_hex(sig["public_key"], 32) and is_hex(sig["sig"], 64))


def label_problem(label: object) -> str | None:
    """Why ``label`` cannot name a group, or ``None``: 1 to 64 characters of ``[A-Za-z0-9_.-]``."""
    if isinstance(label, str) and _LABEL.fullmatch(label):
        return None
    return f"group label {_show(label)} is not 1 to 64 characters of letters, digits, '_', '.' or '-'"


def tensor_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a tensor in a container, or ``None`` when it can.

    A name must be a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes, not ``__metadata__``
    (safetensors' reserved key), without NUL characters or lone surrogates (both break other readers).
    """
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if name == "__metadata__":
        return "is __metadata__, which safetensors reserves"
    if "\0" in name:
        return "contains a NUL character"
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "contains a lone surrogate (invalid Unicode)"
    if n > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def canonical(meta: Mapping[str, Any]) -> bytes:
    """Canonical bytes of parsed metadata minus its self-checks (what the header digest and signature cover)."""
    return _canonical({k: v for k, v in meta.items() if k not in _SELF_CHECKS})


def header_digest(meta: Mapping[str, Any]) -> str:
    """The header digest of parsed metadata (a tamperer can recompute it: it only detects accidents)."""
    return hashlib.sha256(b"chiplock/header/v3" + canonical(meta)).hexdigest()


@dataclass(frozen=True)
class Group:
    """One key label: its transform and, for transforms that detect a wrong key, a MAC of the header under the
    group's content key (``None`` for silent transforms: a keyed check would be a key oracle)."""

    transform: str
    mac: str | None = None


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor's public description: its group, original dtype and shape, the transform's public
    parameters and the tree digest of its stored bytes."""

    group: str
    dtype: str
    shape: tuple[int, ...]
    params: Mapping[str, Any]
    digest: str


@dataclass
class Metadata:
    """The chiplock metadata of one container (the ``__metadata__["chiplock"]`` JSON string).

    Built by the writer, validated by :meth:`from_json`, shown by :meth:`public`: the three never disagree.
    """

    content_id: str
    groups: dict[str, Group]
    tensors: dict[str, TensorInfo]
    license: dict[str, Any] | None = None
    shard: tuple[int, int] | None = None
    created_by: str | None = None
    signature: dict[str, str] | None = None
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- building ---------------------------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        """The JSON object minus its self-checks (what the header digest and the signature cover)."""
        out: dict[str, Any] = {
            "format": FORMAT_NAME, "version": self.version, "content_id": self.content_id,
            "groups": {k: {"transform": g.transform, "mac": g.mac} for k, g in self.groups.items()},
            "tensors": {n: {"group": t.group, "dtype": t.dtype, "shape": list(t.shape), "params": dict(t.params),
                            "digest": t.digest} for n, t in self.tensors.items()},
        }
        if self.created_by is not None:
            out["created_by"] = self.created_by
        if self.license is not None:
            out["license"] = self.license
        if self.shard is not None:
            out["shard"] = {"index": self.shard[0], "count": self.shard[1]}
        return out

    def canonical(self) -> bytes:
        """Canonical bytes of :meth:`body` (what the header digest and the signature cover)."""
        return _canonical(self.body())

    def content_canonical(self) -> bytes:
        """Canonical bytes of the content's description, without the licence and the group MACs: what each
        group's MAC covers (the licence is authenticated by its own wraps)."""
        body = self.body()
        body.pop("license", None)
        for g in body["groups"].values():
            g["mac"] = None
        return _canonical(body)

    def header_digest(self) -> str:
        return header_digest(self.body())

    def to_json(self) -> dict[str, Any]:
        out = self.body()
        out["header_digest"] = self.header_digest()
        if self.signature is not None:
            out["signature"] = self.signature
        return out

    # -- validating -------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, meta: Any, entries: Mapping[str, Mapping[str, Any]]) -> Metadata:
        """Check every field of the parsed metadata against spec.md and the stored ``entries`` (name ->
        safetensors entry, already checked by the reader).

        The header digest only detects accidents: anyone can rewrite an unsigned file's metadata and recompute
        it, so nothing here is trusted before it is checked.

        Raises:
            ContainerError: A rule of spec.md is broken, or the version is not 3.
            InvalidTag: The header digest does not match (the header was altered).
            UnsupportedConfig: A group uses a transform this chiplock does not know.
        """
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise fail("the header has no chiplock metadata")
        version = meta.get("version")
        if _json.is_int(version) and version in (1, 2):
            raise ContainerError(f"this container (version {version}) was written by an older chiplock; this one "
                                 "reads version 3 (per-group keys and licences): lock the model again")
        if not _json.is_int(version) or version != FORMAT_VERSION:
            raise ContainerError(f"container version {_show(version)} is not supported by this chiplock "
                                 f"(it reads version {FORMAT_VERSION}); upgrade chiplock or re-lock the model")
        missing, unknown = _REQUIRED - set(meta), set(meta) - _REQUIRED - _OPTIONAL
        if missing or unknown:
            what = (f"lacks {', '.join(sorted(missing))}" if missing
                    else f"has unknown field(s) {_show(sorted(unknown), 80)}")
            raise fail(f"the chiplock metadata {what}")
        if not is_hex(meta["content_id"], 16):
            raise fail("the content id is not 16 bytes of lowercase hex")
        created_by = meta.get("created_by")
        if created_by is not None and not (isinstance(created_by, str) and len(created_by) <= 256):
            raise fail("the chiplock metadata's created_by is not a short string")
        sig = meta.get("signature")
        if sig is not None and not is_signature(sig):
            raise fail("the signature is malformed (it must be ed25519 with a 32-byte public key and a 64-byte "
                       "signature, in lowercase hex)")
        groups = _groups(meta["groups"])
        md = cls(content_id=meta["content_id"], groups=groups, tensors=_tensors(meta["tensors"], groups, entries),
                 license=_license(meta.get("license")), shard=_shard(meta.get("shard")), created_by=created_by,
                 signature=sig)
        if meta["header_digest"] != md.header_digest():
            raise InvalidTag() from None
        return md

    # -- presenting -------------------------------------------------------------------------------------------
    def public(self) -> dict[str, Any]:
        """What :func:`chiplock.inspect` shows: everything public, no key material (there is none here)."""
        from chiplock.transforms import get_transform

        lic = self.license
        transforms = sorted({g.transform for g in self.groups.values()})
        silent = any(not get_transform(g.transform).detects_wrong_key for g in self.groups.values())
        return {
            "format": FORMAT_NAME, "version": self.version, "content_id": self.content_id,
            "transform": transforms[0] if len(transforms) == 1 else transforms,
            "groups": {k: {"transform": g.transform,
                           "tensors": sum(1 for t in self.tensors.values() if t.group == k)}
                       for k, g in self.groups.items()},
            "created_by": self.created_by,
            "license": "embedded" if lic is not None else "separate (unlock with --license)",
            "sources": [s["source"] for s in lic["sources"]] if lic else [],
            "helpers": {s["source"]: s["helper"] for s in lic["sources"]} if lic else {},
            "secret_required": bool(lic and lic.get("secret")),
            "kdf": {k: v for k, v in lic["kdf"].items() if k != "salt"} if lic else None,
            "signed": self.signature is not None,
            "signer_public_key": (self.signature or {}).get("public_key"),
            "shard": None if self.shard is None else {"index": self.shard[0], "count": self.shard[1]},
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "group": t.group}
                        for n, t in self.tensors.items()},
            "wrong_key": WRONG_KEY_NOTE["silent" if silent else "detected"],
        }


#: What a wrong key does with each kind of transform, stated where users look (inspect, the CLI).
WRONG_KEY_NOTE = {
    "detected": "a wrong device or secret is refused (authenticated licence); the header is authenticated with "
                "the content key",
    "silent": ("a wrong device gets plausible but useless weights and the file has no key check; but structural "
               "statistics of the weights tell wrong-key weights from real ones in milliseconds (docs/attacks.md), "
               "so a key guess costs one Argon2id run and the lock is as strong as the key's entropy"),
}


def _groups(groups: Any) -> dict[str, Group]:
    from chiplock.transforms import available_transforms, get_transform

    if not (isinstance(groups, dict) and 1 <= len(groups) <= MAX_GROUPS):
        raise fail(f"the groups are not an object of 1 to {MAX_GROUPS} entries")
    out = {}
    for label, g in groups.items():
        if label_problem(label):
            raise fail(f"a {label_problem(label)}")
        if not (isinstance(g, dict) and set(g) == _GROUP_FIELDS and isinstance(g["transform"], str)
                and len(g["transform"]) <= 64):
            raise fail(f"group {label!r} is malformed")
        try:
            tf = get_transform(g["transform"])
        except UnsupportedConfig:
            raise UnsupportedConfig(f"the file uses transform {_show(g['transform'])}, which this chiplock does "
                                    f"not know (it knows {', '.join(available_transforms())}); upgrade chiplock") \
                from None
        mac = g["mac"]
        if tf.detects_wrong_key and not is_hex(mac, 32):
            raise fail(f"group {label!r} ({tf.name}) lacks its 32-byte header MAC")
        if not tf.detects_wrong_key and mac is not None:
            raise fail(f"group {label!r} ({tf.name}) carries a header MAC, which its transform must not have")
        out[label] = Group(tf.name, mac)
    return out


def _scalar_ok(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_PARAM_CHARS)


def params_problem(params: Any) -> str | None:
    """Each transform checks the meaning of its parameters when decoding; here only that they are a small map of
    JSON scalars or flat lists of scalars, so a transform never meets a nested or huge value."""
    if (isinstance(params, dict) and len(params) <= MAX_PARAMS
            and all(isinstance(k, str) and len(k) <= 64 for k in params)
            and all(_scalar_ok(v) or (isinstance(v, list) and len(v) <= MAX_PARAM_LIST
                                      and all(_scalar_ok(x) for x in v)) for v in params.values())):
        return None
    return (f"at most {MAX_PARAMS} values, each a scalar, a string of at most {MAX_PARAM_CHARS} characters or a "
            f"list of at most {MAX_PARAM_LIST} scalars")


def _tensors(tensors: Any, groups: dict[str, Group], entries: Mapping[str, Mapping[str, Any]],
             ) -> dict[str, TensorInfo]:
    from chiplock.transforms import get_transform

    if not isinstance(tensors, dict) or set(tensors) != set(entries):
        raise fail("the metadata and the stored tensors disagree")
    out = {}
    for name, entry in entries.items():  # In data order.
        info = tensors[name]
        if not (isinstance(info, dict) and set(info) == _TENSOR_FIELDS and isinstance(info["dtype"], str)
                and info["dtype"] in STORED_DTYPES and info["shape"] == entry["shape"]
                and is_hex(info["digest"], 32) and isinstance(info["group"], str)):
            raise fail(f"the metadata of tensor {_show(name)} is malformed or disagrees with the stored tensor")
        group = groups.get(info["group"])
        if group is None:
            raise fail(f"tensor {_show(name)} names a group the file does not have")
        problem = params_problem(info["params"])
        if problem:
            raise fail(f"the public parameters of tensor {_show(name)} are malformed ({problem})")
        tf = get_transform(group.transform)
        try:
            stored = tf.stored_dtype(info["dtype"])
        except UnsupportedConfig:
            raise fail(f"tensor {_show(name)} has dtype {info['dtype']}, which transform {tf.name} cannot "
                       "store") from None
        if entry["dtype"] != stored:
            raise fail(f"tensor {_show(name)} is stored as {entry['dtype']}, but transform {tf.name} stores "
                       f"{info['dtype']} as {stored}")
        out[name] = TensorInfo(info["group"], info["dtype"], tuple(info["shape"]), info["params"], info["digest"])
    return out


def _license(lic: Any) -> dict[str, Any] | None:
    if lic is None:
        return None
    from chiplock.license import License

    License.from_json(lic)  # Raises ContainerError for a malformed licence.
    return lic


def _shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    if not (isinstance(shard, dict) and set(shard) == {"index", "count"} and _json.is_int(shard["index"])
            and _json.is_int(shard["count"]) and 0 <= shard["index"] < shard["count"] <= MAX_SHARDS):
        raise fail(f"the shard field is malformed (index and count, 0 <= index < count <= {MAX_SHARDS})")
    return shard["index"], shard["count"]
