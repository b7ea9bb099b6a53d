"""Safe reading, strict loading and atomic writing of model weights.

Checkpoints come from the internet (tokenizer, released generators), so reading one must
never run code: ``.safetensors`` files are parsed by safetensors, and torch files
(``.bin``/``.pt``/``.pth``) go through ``torch.load(weights_only=True)``, whose restricted
unpickler rejects anything but tensors and plain containers. Loading is strict: every
mismatch between a file and the model is reported at once, naming the keys.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rear_ds.tmpfile import ClaimedTmp

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_SHOW = 5  # keys listed per kind of mismatch; the rest are counted


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, unsafe, or does not match the model."""


def _few(keys: list) -> str:
    """First few keys, then how many more, so a message stays readable for 100s of keys."""
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def _unpickler_reason(err: Exception) -> str:
    """The first sentence after "WeightsUnpickler error:" in torch's message (the rest of which
    suggests retrying with weights_only=False, which we never do)."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in (rest if found else text).splitlines() if ln.strip()]
    return lines[0].split(". ")[0] if lines else type(err).__name__


def read_state_dict(path: str) -> dict:
    """Read a flat ``{name: tensor}`` state dict onto the CPU without executing pickled code."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path!r} is not a readable safetensors file: {e}") from None
    elif lower.endswith(TORCH_SUFFIXES):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _unpickler_reason(e)
            if "Unsupported global" in reason:  # the pickle references code: refuse, never run it
                raise WeightsError(
                    f"{path!r} was refused: it is not a plain tensor state dict (loading it would run "
                    f"pickled code, which is never done). Convert it to .safetensors with a trusted tool. "
                    f"Details: {reason}") from None
            raise WeightsError(f"{path!r} is not a readable torch weights file (corrupt or truncated?): "
                               f"{reason}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise WeightsError(f"{path!r} is not a readable torch weights file: {e}") from None
    else:
        raise WeightsError(f"{path!r}: unknown weights format; expected one of "
                           f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path!r} holds a {type(state).__name__}, expected a state dict")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        # Typically a training checkpoint ({"model": ..., "optimizer": ...}) instead of a state dict.
        raise WeightsError(f"{path!r} is not a flat state dict of tensors: entries {_few(bad)} are not "
                           f"tensors (top-level keys: {_few([str(k) for k in state])})")
    return dict(state)


@dataclass
class LoadResult:
    """Keys under ``optional_prefixes`` that :func:`load_strict` tolerated."""

    missing_optional: list = field(default_factory=list)  # in the model, not in the file: left as initialised
    ignored_optional: list = field(default_factory=list)  # in the file, not in the model: dropped


def check_state_dict(module: nn.Module, state_dict: Mapping, what: str, expected: str = "",
                     optional_prefixes: Iterable[str] = ()) -> LoadResult:
    """Raise :class:`WeightsError` unless ``state_dict`` has exactly the keys and shapes of ``module``.

    Copies nothing, so ``module`` may live on the meta device. ``what`` names the source (include the
    file path); ``expected`` describes the config the model was built from, so the error says what the
    file was checked against. Keys starting with one of ``optional_prefixes`` may be absent on either
    side (e.g. training-only heads).
    """
    optional = tuple(optional_prefixes)
    model_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def is_optional(key: str) -> bool:
        return bool(optional) and key.startswith(optional)

    missing = [k for k in model_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_shapes]
    wrong = [f"{k} (file {list(state_dict[k].shape)} vs model {list(shape)})"
             for k, shape in model_shapes.items() if k in state_dict and tuple(state_dict[k].shape) != shape]
    result = LoadResult(missing_optional=[k for k in missing if is_optional(k)],
                        ignored_optional=[k for k in unexpected if is_optional(k)])
    missing = [k for k in missing if not is_optional(k)]
    unexpected = [k for k in unexpected if not is_optional(k)]

    if missing or unexpected or wrong:
        lines = [f"{what}: the weights do not match the model"
                 + (f" built for {expected}" if expected else "")
                 + f" (file has {len(state_dict)} tensors, model expects {len(model_shapes)})"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {_few(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {_few(unexpected)}")
        if wrong:
            lines.append(f"  wrong shape for {len(wrong)} keys: {_few(wrong)}")
        raise WeightsError("\n".join(lines))
    return result


def load_strict(module: nn.Module, state_dict: Mapping, what: str, expected: str = "",
                optional_prefixes: Iterable[str] = ()) -> LoadResult:
    """:func:`check_state_dict`, then copy the tensors into ``module`` (cast to its dtypes by ``copy_``)."""
    result = check_state_dict(module, state_dict, what, expected, optional_prefixes)
    ignored = set(result.ignored_optional)
    module.load_state_dict({k: v for k, v in state_dict.items() if k not in ignored}, strict=False)
    return result


def save_safetensors(state_dict: Mapping, path: str, metadata: Optional[dict] = None) -> None:
    """Write ``state_dict`` as safetensors atomically (temp file + rename): readers never see half a file."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightsError(f"{path!r}: safetensors metadata must map str to str")
    tensors, storages = {}, set()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights): give repeats their own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        tensors[name] = t
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with ClaimedTmp(path) as claim:  # one temporary name: a killed writer's leftover is reused, not leaked
        save_file(tensors, claim.tmp, metadata=metadata)
        claim.commit()


def weights_sha256(path: str) -> str:
    """A content hash of a weights file that is the same for the same tensors and metadata.

    A .safetensors file's JSON header is written in an arbitrary key order (the writer uses a hash map), so two
    exports of the same weights can differ byte for byte; the header is hashed in canonical (sorted) form,
    followed by the tensor bytes. Other files are hashed as they are.
    """
    import hashlib
    import json
    import struct

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise WeightsError(f"{path}: not a valid safetensors file (bad header: {e})") from None
            digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
