"""The training checkpoint format, and loading any model grafito can run.

A training run's out_dir holds

    train_config.json   the resolved run configuration
    log.jsonl           one JSON object per logged step and per evaluation
    ckpt/               the latest state, enough to resume exactly:
        config.json + model.safetensors            full fine-tuning: Hugging Face GPT-2 format
        adapter_config.json + adapter.safetensors  LoRA: the adapter only (base named inside)
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


def save_weights(model, folder, base_model=None):
    """Full weights in GPT-2 format, or only the adapter for a LoRA model not merged yet."""
    if any(not layer.merged for layer in lora.lora_layers(model)):
        from dataclasses import asdict

        lora.save_adapter(model, folder, base_model=base_model, base_config=asdict(model.config))
    else:
        model.save_pretrained(folder)


def save_checkpoint(out_dir, name, model, base_model, train_state=None):
    """Write out_dir/name atomically: weights, plus train_state.pt when given."""
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_weights(model, tmp, base_model)
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


def load_weights(folder, base_loader=None, merge=True, **overrides):
    """A GPT from a weights folder: GPT-2 format, or an adapter applied to its base.

    base_loader(name) builds the base model of an adapter (default load_model: a GPT-2 name,
    a hub id, or a folder, itself possibly an adapter).
    With merge=True the adapter is folded in (lora.fold_lora), leaving a plain GPT.
    """
    folder = Path(folder)
    if not is_adapter(folder):
        return GPT.from_pretrained(folder, **overrides)
    meta = lora.read_adapter_config(folder)
    base = (base_loader or load_model)(meta["base_model"], **overrides)
    lora.load_adapter(base, folder)
    if merge:
        lora.fold_lora(base)
    return base


def resolve_model_source(source):
    """A training out_dir resolves to its best/ (else ckpt/) weights; anything else is passed on."""
    path = Path(str(source)).expanduser()
    for folder in (readable_dir(path / BEST), readable_dir(path / LATEST)):
        if folder.is_dir() and ((folder / "config.json").is_file() or is_adapter(folder)):
            return folder
    return path if path.is_dir() else source


def load_model(source, **overrides):
    """Any model grafito can run: a training out_dir, a weights folder (full or adapter),
    a GPT-2 name or a hub repo id. LoRA adapters are merged for inference."""
    resolved = resolve_model_source(source)
    if isinstance(resolved, Path):
        if not ((resolved / "config.json").is_file() or is_adapter(resolved)):
            raise GrafitoError(f"{source}: no model here (expected best/ or ckpt/ of a training run, "
                               f"or config.json + model.safetensors, or an adapter)")
        return load_weights(resolved, **overrides)
    return GPT.from_pretrained(resolved, **overrides)
