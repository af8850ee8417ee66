"""The training checkpoint format, and loading any model grafito can run.

A training run's out_dir holds

    train_config.json   the resolved run configuration
    log.jsonl           one JSON object per logged step and per evaluation
    ckpt/               the latest state, enough to resume exactly:
        config.json + model.safetensors            full fine-tuning: Hugging Face GPT-2 format
        adapter_config.json + adapter.safetensors  LoRA: the adapter only (base named inside,
                                                   with a fingerprint when it is a local folder)
        train_state.pt                             optimizer, grad scaler, step, sampler position,
                                                   RNG states, best val loss (torch.load, weights_only)
    best/               the weights (same files, no train_state.pt) with the lowest val loss
    merged/             LoRA runs with lora_merge=True: base + adapter as one GPT-2 folder

Every folder is written to a temporary sibling and renamed into place, so an interrupted
save never leaves a half-written checkpoint. Weight folders are loadable by
GPT.from_pretrained (full) and by transformers' GPT2LMHeadModel.from_pretrained.
"""

from pathlib import Path

import torch

import lora
from common import GrafitoError, atomic_dir, readable_dir
from model import GPT

TRAIN_STATE = "train_state.pt"
LATEST, BEST, MERGED = "ckpt", "best", "merged"


def save_weights(model, folder, base_model=None, base_fingerprint=None):
    """Full weights in GPT-2 format, or only the adapter for a LoRA model not merged yet
    (with base_fingerprint, from base_fingerprint_of() when training began, checked on load)."""
    if any(not layer.merged for layer in lora.lora_layers(model)):
        from dataclasses import asdict

        lora.save_adapter(model, folder, base_model=base_model, base_config=asdict(model.config),
                          base_fingerprint=base_fingerprint)
    else:
        model.save_pretrained(folder)


def base_fingerprint_of(base_model):
    """weights_fingerprint of a base given as a local folder or run; None for hub names."""
    folder = resolve_model_source(base_model) if base_model else None
    return weights_fingerprint(folder) if isinstance(folder, Path) else None


def weights_fingerprint(folder):
    """A cheap digest of a weights folder: each weight file's size and 16 evenly spread 64 KB
    pieces of it. Retrained or replaced weights change it (training changes nearly every
    byte); it reads about 1 MB per file whatever the model's size, and is no cryptographic check."""
    import hashlib

    from model import PretrainedSource

    folder = readable_dir(folder)
    if is_adapter(folder):
        paths = [folder / lora.ADAPTER_WEIGHTS]
    else:
        try:
            paths = PretrainedSource(folder).weight_files()  # the files from_pretrained reads, shards included
        except GrafitoError:
            return None
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(16):
                f.seek(size * i // 16)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:32]


def save_checkpoint(out_dir, name, model, base_model, train_state=None, base_fingerprint=None):
    """Write out_dir/name atomically: weights, plus train_state.pt when given."""
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_weights(model, tmp, base_model, base_fingerprint)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)


def load_train_state(out_dir):
    folder = readable_dir(Path(out_dir) / LATEST)  # every rank reads; only rank 0's saves repair a swap
    path = folder / TRAIN_STATE
    if not path.is_file():
        raise GrafitoError(f"cannot resume: {path} not found (init_from=resume continues a run in out_dir={out_dir})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise GrafitoError(f"cannot read {path}: {type(err).__name__}: {err}") from None


def is_adapter(folder):
    return (Path(folder) / lora.ADAPTER_CONFIG).is_file()


def load_weights(folder, merge=True, _chain=(), **overrides):
    """A GPT from a weights folder: GPT-2 format, or an adapter applied to its base (loaded by
    load_model: a GPT-2 name, a hub id, or a folder, itself possibly an adapter).
    With merge=True the adapter is folded in (lora.fold_lora), leaving a plain GPT.
    """
    folder = Path(folder)
    readable = readable_dir(folder)
    if not is_adapter(readable):
        return GPT.from_pretrained(readable, **overrides)
    meta = lora.read_adapter_config(readable)
    here = str(folder.resolve())
    if here in _chain:
        raise GrafitoError(f"{folder}: adapter chain loops back to itself ({' -> '.join(_chain + (here,))})")
    base = load_model(meta["base_model"], _chain=_chain + (here,), **overrides)
    expected = meta.get("base_fingerprint")
    base_folder = resolve_model_source(meta["base_model"])
    if expected and isinstance(base_folder, Path) and weights_fingerprint(base_folder) != expected:
        raise GrafitoError(f"{folder}: its base {meta['base_model']} has changed since the adapter was trained "
                           f"(different weights); restore that base, or train the adapter again")
    lora.load_adapter(base, readable)
    if merge:
        lora.fold_lora(base)
    return base


def resolve_model_source(source):
    """A training out_dir stands for its best/ (else ckpt/) weights, a weights folder for
    itself (read from its .old twin during a swap: see readable_dir); a name is passed on."""
    path = Path(str(source)).expanduser()
    for folder in (path / BEST, path / LATEST, path):
        readable = readable_dir(folder)
        if readable.is_dir() and ((readable / "config.json").is_file() or is_adapter(readable)):
            return folder
    return path if readable_dir(path).is_dir() else source


def load_model(source, _chain=(), **overrides):
    """Any model grafito can run: a training out_dir, a weights folder (full or adapter),
    a GPT-2 name or a hub repo id. LoRA adapters are merged for inference."""
    resolved = resolve_model_source(source)
    if isinstance(resolved, Path):
        readable = readable_dir(resolved)
        if not ((readable / "config.json").is_file() or is_adapter(readable)):
            raise GrafitoError(f"{source}: no model here (expected best/ or ckpt/ of a training run, "
                               f"or config.json + model.safetensors, or an adapter)")
        return load_weights(resolved, _chain=_chain, **overrides)
    return GPT.from_pretrained(resolved, **overrides)
