"""``pk.save`` / ``pk.load``: a compressed model as one ``.safetensors`` file.

The file holds the model's ``state_dict`` and, in its metadata under
``"pykernels"``, a JSON manifest: which module became what (a registered
kind and its sizes), the int attributes pruning changed (head counts), the
recipe, the pykernels version, the original architecture's tensor names,
shapes and dtypes, which tensors are one tensor under several names (tied
weights) and which modules one module, and a SHA-256 of the manifest and
the tensors together, so an edited manifest is refused like a flipped
tensor bit. Loading takes an uncompressed instance of the same
architecture, rebuilds the compressed structure from the manifest, loads
the tensors and ties what was tied; anything that does not fit raises
ValueError.

Files of format 1 (pykernels before the manifest was covered) still load;
their SHA-256 covers only the tensors.
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
FORMAT_VERSION = 2
READS = (1, 2)  # format 1: the digest covers only the tensors
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
    # A later step may have replaced a module whose attributes an earlier one set
    # (pruned heads of an attention that is now part of a fused EncoderBlock).
    live = {n for n, _ in model.named_modules(remove_duplicate=False)}
    rec["attrs"] = {f: d for f, d in rec["attrs"].items() if f in live}
    # object.__setattr__: a plain attribute, never a submodule or buffer.
    object.__setattr__(model, RECORD, rec)


def _canonical(manifest: dict[str, Any]) -> bytes:
    """The manifest, less its digest, as the bytes the digest covers: one JSON form
    whatever the key order or spacing of the file's text."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    # Through JSON and back first, so the saver (tuples, int keys) and the loader
    # (lists, str keys) hash the same text.
    body = json.loads(json.dumps(body))
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(tensors: dict[str, Tensor], manifest: dict[str, Any] | None = None) -> str:
    h = hashlib.sha256()
    if manifest is not None:
        text = _canonical(manifest)
        h.update(f"{len(text)}|".encode())
        h.update(text)
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
    ``path``'s directory must exist (FileNotFoundError naming it otherwise):
    like ``torch.save`` and safetensors, pk.save creates no directories.
    """
    st = _safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"pk.save: model must be an nn.Module, got {type(model).__name__}")
    path = _save_path(path)
    rec = getattr(model, RECORD, None)
    fqns = set(rec["modules"]) if rec else set()
    fqns |= {f for f, m in model.named_modules() if type(m).__module__.startswith("pykernels.")}
    # Keep only the outermost: a TuckerConv2d's own convolutions come with it.
    fqns = {f for f in fqns if not any(f.startswith(o + ".") for o in fqns if o and o != f)}
    modules: dict[str, Any] = {}
    shared: dict[str, str] = {}  # a module held under several names: each later name -> first
    first_name = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        first_name.setdefault(id(m), fqn)
    for fqn in sorted(fqns):
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"pk.save: the model has no module {fqn!r} any more") from None
        if first_name[id(m)] != fqn and first_name[id(m)] in fqns:
            shared[fqn] = first_name[id(m)]
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
        key = _storage_key(v)
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
        "shared": shared,
    }
    manifest["sha256"] = _digest(tensors, manifest)
    st.torch.save_file(tensors, os.fspath(path), metadata={"pykernels": json.dumps(manifest)})
    follow_umask(path)  # safetensors leaves its temporary file's 0600


def _storage_key(t: Tensor) -> tuple:
    """What makes two tensors one: the same memory, read the same way."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _save_path(path: Any) -> str:
    """``path`` as a str, refused before any work when it cannot be written: as
    ``torch.save`` and safetensors, pk.save writes a file and creates no directory."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"pk.save: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError("pk.save: path is empty")
    if os.path.isdir(path):
        raise IsADirectoryError(f"pk.save: path {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"pk.save: cannot write {path!r}: its directory {parent!r} does not exist "
            "(pk.save creates no directories, as torch.save does not; os.makedirs it first)"
        )
    return path


def _version() -> str:
    from ..info import version

    return version()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a file written by :func:`save` (ValueError when there is none)."""
    st = _safetensors()
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"pk.load: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
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
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READS:
        raise ValueError(
            f"pk.load: {path!r} has manifest format {version!r}; this pykernels reads "
            f"{', '.join(map(str, READS))}"
        )
    manifest.setdefault("shared", {})  # format 1 recorded no shared modules
    for key, typ in (
        ("modules", dict),
        ("attrs", dict),
        ("aliases", dict),
        ("shared", dict),
        ("sha256", str),
    ):
        if not isinstance(manifest.get(key), typ):
            raise ValueError(f"pk.load: the manifest in {path!r} lacks {key!r}")
    for key in ("aliases", "shared"):
        bad = next(((k, v) for k, v in manifest[key].items() if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"pk.load: the manifest's {key} maps {bad[0]!r} to {bad[1]!r}")
    # The digest is no signature: the rest is checked as what it claims to be, so
    # a forged entry is refused by name instead of failing somewhere inside load.
    for fqn, entry in manifest["modules"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("kind"), str)
            and isinstance(entry.get("config", {}), dict)
        ):
            raise ValueError(
                f"pk.load: the manifest's entry for module {fqn!r} in {path!r} is not "
                f'{{"kind": name, "config": {{...}}}}: {entry!r}'
            )
    for fqn, values in manifest["attrs"].items():
        if not isinstance(values, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62
            for v in values.values()
        ):
            raise ValueError(
                f"pk.load: the manifest's attrs for {fqn!r} in {path!r} are not names of "
                f"non-negative ints: {values!r}"
            )
    steps, recipe = manifest.get("steps", []), manifest.get("recipe")
    if not (isinstance(steps, list) and all(isinstance(e, dict) for e in steps)) or not (
        recipe is None or isinstance(recipe, str)
    ):
        # Only recorded, but a later compress of the loaded model extends them.
        raise ValueError(
            f"pk.load: the manifest's recipe in {path!r} is not a string with a list of steps"
        )
    original = manifest.get("original")
    if original is not None and not (
        isinstance(original, list) and all(_signature_row(e) for e in original)
    ):
        raise ValueError(
            f"pk.load: the manifest's original architecture in {path!r} is not a list of "
            "[name, shape, dtype] rows"
        )
    return manifest


def _signature_row(e: Any) -> bool:
    return (
        isinstance(e, list)
        and len(e) == 3
        and isinstance(e[0], str)
        and isinstance(e[1], list)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in e[1])
        and isinstance(e[2], str)
    )


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


def _check_size(fqn: str, mk: Any, config: Any, sizes: dict[str, int]) -> None:
    """Refuses a module the file could not fill before it is built: a manifest that
    says a layer is 40000 x 40000 (the digest is no signature; anyone can
    recompute it) must not make the load allocate gigabytes. The module is built
    on the meta device, which allocates nothing, and its values counted against
    the file's tensors under its name."""
    try:
        with torch.device("meta"):
            probe = mk.build(config)
    except Exception:  # noqa: BLE001 - the real build reports what is wrong
        return
    need = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    prefix = fqn + "." if fqn else ""
    have = sum(n for k, n in sizes.items() if k.startswith(prefix))
    # Slack for buffers a layer derives at load (packed layouts, sums of rows).
    if need > 2 * have + 65536:
        raise ValueError(
            f"pk.load: the manifest describes {fqn or 'the model'!r} as a {mk.name} of {need:,} "
            f"values; the file holds {have:,} for it"
        )


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, dict] | None:
    """(module, name, its _parameters or _buffers) holding state_dict entry ``key`` as
    an attribute; None for an entry a module writes itself (a packed weight)."""
    prefix, _, name = key.rpartition(".")
    try:
        m = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return None
    for table in (m._parameters, m._buffers):
        if isinstance(table.get(name), Tensor):
            return m, name, table
    return None


def _untie(model: nn.Module, tensors: dict[str, Tensor], aliases: dict[str, str]) -> None:
    """Gives a tensor of its own to each entry that ``model`` ties to another but the
    file stored apart: loading both into one tensor would keep only the last."""
    first: dict[tuple, str] = {}  # the model's tensor -> the file's tensor loaded into it
    names: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names[id(m)] = names.get(id(m), 0) + 1
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in tensors or not isinstance(t, Tensor) or t.numel() == 0:
            continue
        src = aliases.get(key, key)
        seen = first.setdefault(_storage_key(t), src)
        if seen == src:
            continue
        owner = _owner(model, key)
        if owner is None or names[id(owner[0])] > 1:
            raise ValueError(
                f"pk.load: {key!r} and {seen!r} are one tensor in this model but two in the "
                "file, and cannot be told apart here (a module under several names)"
            )
        m, name, table = owner
        fresh = table[name].detach().clone()
        if isinstance(table[name], nn.Parameter):
            fresh = nn.Parameter(fresh, requires_grad=table[name].requires_grad)
        table[name] = fresh


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Makes each alias the very tensor it names, as in the saved model (a tied
    embedding and output projection, a QATLinear sharing its Linear's weight)."""
    for dup, src in aliases.items():
        a, b = _owner(model, dup), _owner(model, src)
        if a is None or b is None:
            continue  # loaded by value; a module's own layout, not an attribute
        (_, dup_name, dup_table), (_, src_name, src_table) = a, b
        if (dup_table is a[0]._parameters) != (src_table is b[0]._parameters):
            continue  # a parameter and a buffer: equal values, kinds kept
        dup_table[dup_name] = src_table[src_name]


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuilds a compressed model from :func:`save`'s file in ``model`` and returns it.

    ``model`` is an uncompressed instance of the architecture that was
    compressed (freshly constructed or ``from_pretrained``); it is changed in
    place: modules are replaced by the manifest's kinds, pruned attributes set,
    every tensor loaded, and tensors and modules tied as they were in the saved
    model. Its outputs then equal the saved model's bit for bit. Raises
    ValueError for a file from another architecture, a corrupted or edited
    file, or a manifest naming a module kind this process does not know; a
    refused load may leave ``model`` partly rebuilt.
    """
    st = _safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"pk.load: model must be an nn.Module, got {type(model).__name__}")
    manifest = read_manifest(path)
    path = os.fsdecode(os.fspath(path))
    _check_architecture(model, manifest)
    try:
        tensors = st.torch.load_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"pk.load: cannot read the tensors of {os.fspath(path)!r}: {e}") from None
    covered = manifest if manifest["format_version"] >= 2 else None
    if _digest(tensors, covered) != manifest["sha256"]:
        what = "its manifest's or tensors'" if covered is not None else "its tensors'"
        raise ValueError(f"pk.load: {os.fspath(path)!r} is corrupted ({what} SHA-256 differs)")

    sizes = {k: t.numel() for k, t in tensors.items()}
    sizes.update({d: sizes[s] for d, s in manifest["aliases"].items() if s in sizes})
    built: dict[str, nn.Module] = {}
    for fqn, entry in manifest["modules"].items():
        if fqn in manifest["shared"]:
            continue  # the module of another name: put in place below
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
        _check_size(fqn, mk, entry.get("config", {}), sizes)
        try:
            new = mk.build(entry.get("config", {}))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"pk.load: cannot rebuild {fqn!r} as {kind_name}: {e}") from None
        new = new.to(module_device(old))
        new.train(old.training)
        built[fqn] = new
        if fqn:
            model.set_submodule(fqn, new)
        else:
            model = new
    for fqn, first in manifest["shared"].items():
        if not fqn or first not in built:
            raise ValueError(
                f"pk.load: the manifest shares module {fqn!r} with {first!r}, which it does "
                "not rebuild"
            )
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"pk.load: the manifest names module {fqn!r}, absent here") from None
        model.set_submodule(fqn, built[first])
    for fqn, values in manifest["attrs"].items():
        try:
            m = model.get_submodule(fqn) if fqn else model
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

    aliases = manifest["aliases"]
    for dup, src in aliases.items():
        if src not in tensors or dup in tensors:
            raise ValueError(
                f"pk.load: alias {dup!r} names {src!r}, which is not a tensor of the file, "
                "or names a stored tensor"
            )
        tensors[dup] = tensors[src]
    _untie(model, tensors, aliases)
    try:
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        # A layer's own load check (a sparse structure, a code past its codebook)
        # names the entry; the file is named here.
        raise ValueError(
            f"pk.load: the tensors of {os.fspath(path)!r} do not fit the rebuilt model: {e}"
        ) from None
    _tie(model, aliases)
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
