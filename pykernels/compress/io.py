"""``pk.save`` / ``pk.load``: a compressed model as one ``.safetensors`` file.

The file holds the model's ``state_dict`` and, in its metadata under
``"pykernels"``, a JSON manifest: which module became what (a registered
kind and its sizes), the int attributes pruning changed (head counts), the
recipe, the pykernels version, the original architecture's tensor names,
shapes and dtypes, and a SHA-256 of the tensors. Loading takes an
uncompressed instance of the same architecture, rebuilds the compressed
structure from the manifest and loads the tensors; anything that does not
fit raises ValueError.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from .._files import follow_umask
from .context import module_device
from .kinds import dtype_name, module_kind_named, module_kind_names, module_kind_of
from .walk import guard_fused_paths

FORMAT = "pykernels.compress"
FORMAT_VERSION = 1
RECORD = "_pk_compression"  # attribute of a compressed model: what compress changed


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "pk.save / pk.load need safetensors: pip install safetensors "
            '(or pip install "pykernels[demo]")'
        ) from None
    return safetensors


def signature(model: nn.Module) -> list[list[Any]]:
    """[name, shape, dtype] of every state_dict tensor: what an architecture looks like."""
    return [
        [k, list(v.shape), dtype_name(v.dtype)]
        for k, v in model.state_dict().items()
        if isinstance(v, Tensor)
    ]


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def record(model: nn.Module, steps: list[Any], original: nn.Module, changes, attrs) -> None:
    """Attaches what :func:`pykernels.compress` did to the compressed model, for save."""
    old = getattr(model, RECORD, None)
    rec = {
        "steps": (old["steps"] if old else []) + [s.spec() for s in steps],
        "recipe": "+".join(
            ([old["recipe"]] if old and old.get("recipe") else []) + [str(s) for s in steps]
        ),
        "model_class": old["model_class"] if old else _type_name(original),
        "original": old["original"] if old else signature(original),
        "modules": sorted(set(old["modules"] if old else []) | set(changes)),
        "attrs": {**(old["attrs"] if old else {})},
    }
    for fqn, d in attrs.items():
        rec["attrs"].setdefault(fqn, {}).update(d)
    # object.__setattr__: a plain attribute, never a submodule or buffer.
    object.__setattr__(model, RECORD, rec)


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes ``model`` (from :func:`pykernels.compress`) to one ``.safetensors`` file.

    A model that did not come from ``compress`` is saved too, with every
    pykernels layer in it described; it then has no record of its original
    architecture, so :func:`load` can check only that the tensors fit.
    """
    st = _safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"pk.save: model must be an nn.Module, got {type(model).__name__}")
    rec = getattr(model, RECORD, None)
    fqns = set(rec["modules"]) if rec else set()
    fqns |= {f for f, m in model.named_modules() if type(m).__module__.startswith("pykernels.")}
    # Keep only the outermost: a TuckerConv2d's own convolutions come with it.
    fqns = {f for f in fqns if not any(f.startswith(o + ".") for o in fqns if o and o != f)}
    modules: dict[str, Any] = {}
    for fqn in sorted(fqns):
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"pk.save: the model has no module {fqn!r} any more") from None
        mk = module_kind_of(m)
        if mk is None:
            raise ValueError(
                f"pk.save: module {fqn!r} is a {type(m).__name__}, which has no registered kind "
                f"(pykernels.compress.register_kind); known: {', '.join(module_kind_names())}"
            )
        modules[fqn] = {"kind": mk.name, "config": mk.describe(m)}

    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, Tensor):
            raise ValueError(f"pk.save: state_dict entry {k!r} is not a tensor")
        v = v.detach()
        key = (
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            v.stride(),
            v.dtype,
        )
        if v.numel() and key in by_storage:
            aliases[k] = by_storage[key]  # a tied weight: stored once
            continue
        by_storage[key] = k
        tensors[k] = v.to("cpu", copy=True).contiguous()

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pykernels_version": _version(),
        "torch_version": torch.__version__,
        "recipe": rec["recipe"] if rec else None,
        "steps": rec["steps"] if rec else [],
        "model_class": rec["model_class"] if rec else _type_name(model),
        "original": rec["original"] if rec else None,
        "modules": modules,
        "attrs": rec["attrs"] if rec else {},
        "aliases": aliases,
        "sha256": _digest(tensors),
    }
    st.torch.save_file(tensors, os.fspath(path), metadata={"pykernels": json.dumps(manifest)})
    follow_umask(path)  # safetensors leaves its temporary file's 0600


def _version() -> str:
    from ..info import version

    return version()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a file written by :func:`save` (ValueError when there is none)."""
    st = _safetensors()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pk.load: no such file: {path!r}")
    try:
        with st.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"pk.load: {path!r} is not a readable safetensors file: {e}") from None
    if "pykernels" not in meta:
        raise ValueError(
            f"pk.load: {path!r} has no pykernels manifest (was it written by pk.save?)"
        )
    try:
        manifest = json.loads(meta["pykernels"])
    except json.JSONDecodeError as e:
        raise ValueError(f"pk.load: the manifest in {path!r} is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"pk.load: {path!r} holds no {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"pk.load: {path!r} has manifest format {manifest.get('format_version')!r}; "
            f"this pykernels reads {FORMAT_VERSION}"
        )
    for key, typ in (("modules", dict), ("attrs", dict), ("aliases", dict), ("sha256", str)):
        if not isinstance(manifest.get(key), typ):
            raise ValueError(f"pk.load: the manifest in {path!r} lacks {key!r}")
    return manifest


def _check_architecture(model: nn.Module, manifest: dict[str, Any]) -> None:
    original = manifest.get("original")
    if original is None:
        return  # not from compress: the strict load below is the check
    mine = signature(model)
    if mine == original:
        return
    theirs = {e[0]: e for e in original}
    ours = {e[0]: e for e in mine}
    detail = ""
    for name in theirs:
        if name not in ours:
            detail = f"the file's model has {name!r}, this one does not"
            break
        if ours[name] != theirs[name]:
            detail = (
                f"{name!r} is {ours[name][1]} {ours[name][2]} here, "
                f"{theirs[name][1]} {theirs[name][2]} in the file"
            )
            break
    else:
        extra = next((n for n in ours if n not in theirs), None)
        detail = f"this model has {extra!r}, the file's does not" if extra else "order differs"
    raise ValueError(
        f"pk.load: the file was saved from another architecture ({manifest.get('model_class')}; "
        f"this model is {_type_name(model)}): {detail}. Pass an uncompressed instance of the "
        "same model, in the same dtype."
    )


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuilds a compressed model from :func:`save`'s file in ``model`` and returns it.

    ``model`` is an uncompressed instance of the architecture that was
    compressed (freshly constructed or ``from_pretrained``); it is changed in
    place: modules are replaced by the manifest's kinds, pruned attributes set,
    and every tensor loaded. Its outputs then equal the saved model's bit for
    bit. Raises ValueError for a file from another architecture, a corrupted
    file, or a manifest naming a module kind this process does not know.
    """
    st = _safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"pk.load: model must be an nn.Module, got {type(model).__name__}")
    manifest = read_manifest(path)
    _check_architecture(model, manifest)
    try:
        tensors = st.torch.load_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"pk.load: cannot read the tensors of {os.fspath(path)!r}: {e}") from None
    if _digest(tensors) != manifest["sha256"]:
        raise ValueError(
            f"pk.load: {os.fspath(path)!r} is corrupted (its tensors' SHA-256 differs)"
        )

    for fqn, entry in manifest["modules"].items():
        kind_name = entry.get("kind") if isinstance(entry, dict) else None
        mk = module_kind_named(kind_name) if isinstance(kind_name, str) else None
        if mk is None:
            raise ValueError(
                f"pk.load: the manifest names module kind {kind_name!r} for {fqn!r}, which this "
                f"process does not know; known: {', '.join(module_kind_names())}"
            )
        try:
            old = model.get_submodule(fqn) if fqn else model
        except AttributeError:
            raise ValueError(f"pk.load: the manifest names module {fqn!r}, absent here") from None
        try:
            new = mk.build(entry.get("config", {}))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"pk.load: cannot rebuild {fqn!r} as {kind_name}: {e}") from None
        new = new.to(module_device(old))
        new.train(old.training)
        if fqn:
            model.set_submodule(fqn, new)
        else:
            model = new
    for fqn, values in manifest["attrs"].items():
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(
                f"pk.load: the manifest sets attributes of {fqn!r}, absent here"
            ) from None
        for name, value in values.items():
            cur = getattr(m, name, None)
            if not isinstance(cur, int) or not isinstance(value, int):
                raise ValueError(
                    f"pk.load: the manifest sets {fqn}.{name} = {value!r}, which is not an int "
                    "attribute of this model"
                )
            setattr(m, name, value)

    for dup, src in manifest["aliases"].items():
        if src not in tensors:
            raise ValueError(f"pk.load: alias {dup!r} names {src!r}, absent from the file")
        tensors[dup] = tensors[src]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"pk.load: the file's tensors do not fit the rebuilt model: {e}") from None
    # The rebuilt layers are fresh modules, without the hooks compress put on
    # the ones a fused transformer path would read.
    guard_fused_paths(model)
    object.__setattr__(
        model,
        RECORD,
        {
            "steps": manifest.get("steps", []),
            "recipe": manifest.get("recipe"),
            "model_class": manifest.get("model_class"),
            "original": manifest.get("original"),
            "modules": sorted(manifest["modules"]),
            "attrs": manifest["attrs"],
        },
    )
    return model
