"""Where a model comes from, and the training run folder: its format and the rules that
keep it whole.

A model source is one of: a training run's out_dir (its best/ weights, else ckpt/), a
weights folder (config.json + model.safetensors, transformers' layout), an adapter folder
(adapter_config.json + adapter.safetensors, applied to the base it names), a GPT-2 name
(gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a hub repo id of GPT-2 architecture.
resolve() tells which; load_model() loads any of them.

A training run's out_dir holds

    train_config.json   the resolved run configuration
    log.jsonl           one JSON object per logged step and per evaluation
    ckpt/               the latest state, enough to resume exactly:
        config.json + model.safetensors            full fine-tuning: Hugging Face GPT-2 format
        adapter_config.json + adapter.safetensors  LoRA: the adapter only (base named inside,
                                                   with a fingerprint when it is a local folder)
        train_state.pt                             optimizer, grad scaler, step, sampler position,
                                                   every rank's RNG states, best val loss (weights_only)
      an FSDP run's (--fsdp) instead, written by every rank, no rank holding the whole model:
        config.json                                full fine-tuning: the model's shape, no weights
        adapter_config.json + adapter.safetensors  LoRA: the adapter, as above (it is small)
        shards/                                    torch.distributed.checkpoint: each rank's shard
                                                   of the trained weights and of their AdamW state
        train_state.pt                             as above, without the optimizer
    best/               the weights (same files, no train_state.pt) with the lowest val loss;
                        always a plain folder (an FSDP run gathers it on rank 0's CPU)
    merged/             LoRA runs with lora_merge=True: base + adapter as one GPT-2 folder
    .lock               held by the run's first process while it trains: a second run is refused

Every folder is written to a temporary sibling and renamed into place (common.atomic_dir),
so an interrupted save never leaves a half-written checkpoint; best/ is written before
ckpt/, so a resume never knows of a best/ that is not there. An FSDP run's ckpt/ is renamed
by rank 0 only once every rank has written its shards into the temporary folder.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import hub
import lora
from common import GrafitoError, atomic_dir, current_version, remove_stale_temporaries
from distributed import every_rank_agrees, gather_full_weights, on_first_rank, reshard, share_from_first_rank
from model import (GPT, PRESETS, WEIGHT_FILES, GPTConfig, config_from_hf, hf_config, read_json, shard_names,
                   weight_files)

TRAIN_STATE = "train_state.pt"
SHARDS = "shards"  # an FSDP run's ckpt/: torch.distributed.checkpoint's files
LATEST, BEST, MERGED = "ckpt", "best", "merged"
STATE_FORMAT = "grafito-train-2"
HUB_REPOS = {name: f"openai-community/{name}" for name in PRESETS}
OFFLINE_HINT = ("Pass a local folder instead (init_from=path/to/dir) holding config.json and model.safetensors, "
                "e.g. one written by GPT2LMHeadModel.save_pretrained, or retry online (unset HF_HUB_OFFLINE).")


# ----------------------------------------------------------------------------- where a model comes from

@dataclass
class Source:
    """kind: 'run' (path: the out_dir), 'weights' or 'adapter' (path: the folder), or 'hub' (repo_id)."""
    kind: str
    name: str  # as given
    path: Path = None
    repo_id: str = None

    def describe(self):
        """A stable name for this source, recorded as an adapter's base."""
        return str(self.path.resolve()) if self.path is not None else self.name


def best(out_dir):
    return current_version(Path(out_dir) / BEST)


def latest(out_dir):
    return current_version(Path(out_dir) / LATEST)


def _holds_weights(folder):
    return (folder / "config.json").is_file() or (folder / lora.ADAPTER_CONFIG).is_file()


def resolve(source):
    """The Source that `source` (a path or a name, as the user wrote it) stands for."""
    name = str(source)
    path = Path(name).expanduser()
    if _holds_weights(best(path)) or _holds_weights(latest(path)):
        return Source("run", name, path=path)
    folder = current_version(path)
    if (folder / lora.ADAPTER_CONFIG).is_file():
        return Source("adapter", name, path=path)
    if (folder / "config.json").is_file():
        return Source("weights", name, path=path)
    if folder.is_dir():
        raise GrafitoError(f"{name}: no model here (expected best/ or ckpt/ of a training run, or config.json + "
                           f"model.safetensors, or an adapter)")
    if name in HUB_REPOS:
        return Source("hub", name, repo_id=HUB_REPOS[name])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/", "~")):
        return Source("hub", name, repo_id=name)
    raise GrafitoError(f"{name!r}: no such model folder, and not a GPT-2 name ({', '.join(PRESETS)}) or a hub "
                       f"repo id (owner/name)")


def model_source(init_from, out_dir, latest_checkpoint=False):
    """The Source a command's init_from and out_dir options name, or None for init_from=scratch.
    'resume' is the training run in out_dir: its best/ weights (else ckpt/), or with
    latest_checkpoint=True its ckpt/, which a resumed run continues from."""
    if init_from == "scratch":
        return None
    if init_from != "resume":
        return resolve(init_from)
    run = Path(out_dir).expanduser()
    if not run.is_dir():
        raise GrafitoError(f"no training run in out_dir={out_dir}: train one (python train.py config/ruby_002.py), "
                           f"pass its folder with --out_dir, or use another model, e.g. --init_from=gpt2 or "
                           f"--init_from=path/to/model")
    return resolve(latest(run)) if latest_checkpoint else resolve(out_dir)


def weights_folder(source):
    """The local folder holding a source's weights (a run's best/, else ckpt/; a hub repo's
    files downloaded into the hub cache, config.json first so a wrong model fails before
    a multi-GB download)."""
    if source.kind == "run":
        return best(source.path) if _holds_weights(best(source.path)) else latest(source.path)
    if source.kind in ("weights", "adapter"):
        return current_version(source.path)
    hint = OFFLINE_HINT if source.repo_id != source.name else f"No local folder {source.name!r} exists either. " + OFFLINE_HINT
    config = hub.download(source.repo_id, "config.json", local_hint=hint)
    unavailable = None
    for filename in WEIGHT_FILES:
        try:
            first = hub.download(source.repo_id, filename, local_hint=hint)
        except hub.HubFileMissing:
            continue
        except hub.HubUnavailable as err:  # offline: another format may still be cached
            unavailable = err
            continue
        for shard in shard_names(first):
            hub.download(source.repo_id, shard, local_hint=hint)
        return config.parent  # the hub cache keeps a revision's files in one snapshot folder
    raise unavailable or GrafitoError(f"hub repo {source.repo_id!r} holds none of {', '.join(WEIGHT_FILES)}")


def load_model(source, merge=True, adapters_above=(), sharded=False, **overrides):
    """A GPT from any source. An adapter is applied to its base (itself any source) and, with
    merge=True, folded into it (lora.fold_lora): a plain GPT for inference and export.
    overrides go to GPT.from_pretrained (block_size, dropout, bias); adapters_above: the
    adapter folders whose bases are being loaded (a chain that loops is an error).
    sharded=True: a fully fine-tuned FSDP checkpoint gives its shape only, the weights on the
    meta device (load_sharded fills them once the model is sharded); without it, an error."""
    source = source if isinstance(source, Source) else resolve(source)
    folder = weights_folder(source)
    if not (folder / lora.ADAPTER_CONFIG).is_file() and (folder / SHARDS).is_dir():
        if not sharded:
            raise GrafitoError(f"{folder} is a sharded checkpoint of an FSDP run: its weights are split into the "
                               f"run's shards, read only when the run resumes (--init_from=resume --fsdp=True). "
                               f"Load the run's best/ instead, a plain Hugging Face folder")
        return _shape_only(folder, **overrides)
    if not (folder / lora.ADAPTER_CONFIG).is_file():
        return GPT.from_pretrained(folder, **overrides)
    meta = lora.read_adapter_config(folder)
    here = str(folder.resolve())
    if here in adapters_above:
        raise GrafitoError(f"{folder}: adapter chain loops back to itself ({' -> '.join(adapters_above + (here,))})")
    base_source = resolve(meta["base_model"])
    model = load_model(base_source, adapters_above=adapters_above + (here,), **overrides)
    expected = meta.get("base_fingerprint")
    if expected and base_source.kind != "hub" and weights_fingerprint(weights_folder(base_source)) != expected:
        raise GrafitoError(f"{folder}: its base {meta['base_model']} has changed since the adapter was trained "
                           f"(different weights); restore that base, or train the adapter again")
    lora.load_adapter(model, folder)
    return lora.fold_lora(model) if merge else model


def _shape_only(folder, **overrides):
    """The GPT a sharded checkpoint's config.json describes, its weights on the meta device."""
    config = config_from_hf(read_json(folder / "config.json", "model config"), where=str(folder / "config.json"))
    for key, value in overrides.items():  # a resume's dropout, and bias=False for a model saved with zero biases
        setattr(config, key, value)
    config.check(where=str(folder))
    with torch.device("meta"):
        return GPT(config)


def model_config(source):
    """The GPTConfig of a source's model, read without its weights (a hub model: config.json only)."""
    if source.kind == "hub":
        if source.name in PRESETS:
            return GPTConfig.preset(source.name)
        path = hub.download(source.repo_id, "config.json", local_hint=OFFLINE_HINT)
        return config_from_hf(read_json(path, "model config"), where=f"{source.repo_id}: config.json")
    folder = weights_folder(source)
    if (folder / lora.ADAPTER_CONFIG).is_file():
        return model_config(resolve(lora.read_adapter_config(folder)["base_model"]))
    return config_from_hf(read_json(folder / "config.json", "model config"), where=str(folder / "config.json"))


def weights_fingerprint(folder):
    """A cheap digest of a weights folder: each weight file's size and 16 evenly spread 64 KB
    pieces of it. Retrained or replaced weights change it (training changes nearly every
    byte); it reads about 1 MB per file whatever the model's size, and is no cryptographic check."""
    folder = current_version(folder)
    if (folder / lora.ADAPTER_CONFIG).is_file():
        paths = [folder / lora.ADAPTER_WEIGHTS]
    else:
        try:
            paths = weight_files(folder)
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


# ----------------------------------------------------------------------------- writing weights

def base_fingerprint(source):
    """weights_fingerprint of a local base (None for the hub's, which are pinned by name).
    Taken when training begins: a base that changes later makes the adapter refuse to load."""
    return None if source.kind == "hub" else weights_fingerprint(weights_folder(source))


def save_weights(model, folder, base_name=None, base_fingerprint=None):
    """Full weights in GPT-2 format, or only the adapter for a LoRA model not merged yet
    (naming its base, with the base's fingerprint)."""
    if any(not layer.merged for layer in lora.lora_layers(model)):
        lora.save_adapter(model, folder, base_model=base_name, base_config=asdict(model.config),
                          base_fingerprint=base_fingerprint)
    else:
        model.save_pretrained(folder)


def save_checkpoint(out_dir, name, model, base_name=None, base_fingerprint=None, train_state=None):
    """Write out_dir/name atomically: weights, plus train_state.pt when given."""
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_weights(model, tmp, base_name, base_fingerprint)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)


# ----------------------------------------------------------------------------- an FSDP run's checkpoints

def trained_names(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def whole_copy(model, weights):
    """A CPU GPT shaped like model (sharded) holding weights, the gathered whole tensors by
    name: what save_weights writes. What was not gathered (a LoRA base) stays on the meta device."""
    with torch.device("meta"):
        copy = GPT(model.config)
        if lora.lora_layers(model):
            lora.apply_lora(copy, model.lora_config)
    copy.load_state_dict(weights, strict=False, assign=True)
    copy.lm_head.weight = copy.transformer.wte.weight  # tied again: assign replaced the token embedding
    return copy


def save_gathered(out_dir, name, model, base_name, base_fingerprint, rank, world, device):
    """out_dir/name (best/) as a plain folder from a sharded model: its trained weights gathered
    whole onto rank 0's CPU, one tensor at a time, and written there. Every rank calls it."""
    weights = gather_full_weights(model, trained_names(model), rank)
    on_first_rank(lambda: save_checkpoint(out_dir, name, whole_copy(model, weights), base_name, base_fingerprint),
                  rank, world, device)


def _sharded_state(model, optimizer):
    """{'model': this rank's shards of the trained weights, 'optimizer': of their AdamW state}, by name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    reshard(model)
    trained = trained_names(model)  # the tied output layer once (as the token embedding), no frozen base
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trained}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(out_dir, model, optimizer, base_name, base_fingerprint, train_state, rank, world, device):
    """out_dir/ckpt of a sharded model: every rank writes its shards (torch.distributed.checkpoint),
    rank 0 the files that say what the model is, and train_state.pt. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(model, optimizer)
    adapter = gather_full_weights(model, trained_names(model), rank) if lora.lora_layers(model) else None

    def write(tmp):
        dcp.save(state, checkpoint_id=tmp / SHARDS)
        if rank == 0:
            if adapter is not None:
                save_weights(whole_copy(model, adapter), tmp, base_name, base_fingerprint)
            else:
                (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
            torch.save(train_state, tmp / TRAIN_STATE)

    write_on_every_rank(Path(out_dir) / LATEST, write, rank, device)


def save_run(out_dir, model, optimizer, train_state, improved, base_name, base_fingerprint, rank, world, device,
             sharded=False):
    """An evaluation's saves: best/ (when improved) then ckpt/ with train_state and the optimizer.
    Rank 0 alone, or with a sharded model every rank (best/ gathered, ckpt/ sharded)."""
    if not sharded:
        if improved:
            save_checkpoint(out_dir, BEST, model, base_name, base_fingerprint)
        save_checkpoint(out_dir, LATEST, model, base_name, base_fingerprint,
                        {**train_state, "optimizer": optimizer.state_dict()})
        return
    if improved:
        save_gathered(out_dir, BEST, model, base_name, base_fingerprint, rank, world, device)
    save_sharded(out_dir, model, optimizer, base_name, base_fingerprint, train_state, rank, world, device)


def restore(train_state, out_dir, model, optimizer, scaler, sharded=False):
    """A resume's optimizer and grad scaler (and a sharded model's trained weights) from out_dir's ckpt/."""
    if sharded:
        load_sharded(latest(out_dir), model, optimizer)
    else:
        optimizer.load_state_dict(train_state["optimizer"])
    scaler.load_state_dict(train_state["scaler"])


def load_sharded(folder, model, optimizer):
    """Every rank: its shards of the trained weights and of their AdamW state, from folder's shards/."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    shards = current_version(folder) / SHARDS
    if not (shards / ".metadata").is_file():
        raise GrafitoError(f"cannot resume: {shards} is not a complete sharded checkpoint (no .metadata); was the "
                           f"run trained with --fsdp?")
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=shards)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def write_on_every_rank(final_dir, write, rank, device):
    """write(tmp) on every rank into one temporary sibling of final_dir that rank 0 then renames
    into place, by atomic_dir's rules: a kill at any moment leaves the previous final_dir whole.
    Rank 0 makes the folder and tells the others its name, renames it only once every rank has
    said its part is written, and tells them whether the rename worked; a failure anywhere
    stops every rank with a message."""
    final_dir = Path(final_dir)

    def write_and_agree(tmp):
        error = None
        try:
            write(tmp)
        except Exception as err:
            error = err
        if not every_rank_agrees(error is None, device):
            raise error or GrafitoError(f"rank {rank}: stopping, another rank failed to write its part of "
                                        f"{final_dir} (see its message); the previous {final_dir.name}/ is kept")

    if rank != 0:
        name = share_from_first_rank(None)
        if name is None:
            raise GrafitoError(f"rank {rank}: stopping, rank 0 could not start writing {final_dir} (see its message)")
        write_and_agree(Path(name))
        if not share_from_first_rank(None):
            raise GrafitoError(f"rank {rank}: stopping, rank 0 failed to put {final_dir} in place (see its message)")
        return
    stack = ExitStack()
    try:
        tmp = stack.enter_context(atomic_dir(final_dir))
    except BaseException:
        share_from_first_rank(None)
        raise
    written = False
    try:
        with stack:  # leaving it renames tmp into place
            share_from_first_rank(str(tmp))
            write_and_agree(tmp)
            written = True
    except BaseException:
        if written:  # every rank wrote; the rename failed
            share_from_first_rank(False)
        raise
    share_from_first_rank(True)


# ----------------------------------------------------------------------------- the run folder

# settings a resumed run must share with the run it continues, or it would not continue the same way
RESUME_FIXED = ("dataset", "dataset_weights", "block_size", "batch_size", "gradient_accumulation_steps", "tokens_per_step", "seed",
                "eval_iters", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "n_layer", "n_head",
                "n_embd", "bias", "fsdp")  # fsdp: the checkpoint's format (whole or sharded)
RUN_FILES = (LATEST, BEST, MERGED, "log.jsonl", "loss.png")


def check_writable(out_dir):
    """Fail now, not after hours of training, if out_dir cannot be created or written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise GrafitoError(f"out_dir {out_dir} cannot be written ({err.strerror or err}); choose another out_dir") from None


def existing_run(out_dir):
    """The files of an earlier run in out_dir (a folder swapped out mid-save counts too)."""
    out_dir = Path(out_dir)
    names = list(RUN_FILES) + [name + ".old" for name in (LATEST, BEST, MERGED)]
    return [out_dir / name for name in names if (out_dir / name).exists()]


def check_new_run(out_dir, init_source, overwrite):
    """A new run may start in out_dir: refused if it holds a run (unless overwrite) or if the
    model it starts from lies inside the run files that overwrite would delete."""
    out_dir = Path(out_dir)
    if init_source is not None and init_source.path is not None:
        start = init_source.path.resolve()
        inside = {(out_dir / name).resolve() for name in (LATEST, BEST, MERGED)}
        if start == out_dir.resolve() or inside & {start, *start.parents}:
            raise GrafitoError(f"init_from={init_source.name} lies inside out_dir={out_dir}: this run would overwrite "
                               f"the weights it starts from. Continue that run with init_from=resume, or choose "
                               f"another out_dir")
    found = existing_run(out_dir)
    if found and not overwrite:
        raise GrafitoError(f"{out_dir} already holds a run ({found[0]}); continue it with init_from=resume, choose "
                           f"another out_dir, or pass --overwrite to start a new run there")


def clear_run(out_dir):
    """Delete an earlier run's files (overwrite), once the new run is known to start."""
    for path in existing_run(out_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def remove_stale_saves(out_dir):
    """Temporary checkpoint folders that killed saves left behind (their writers are gone)."""
    for name in (LATEST, BEST, MERGED):
        remove_stale_temporaries(Path(out_dir) / name)


def load_train_state(out_dir):
    path = latest(out_dir) / TRAIN_STATE
    if not path.is_file():
        raise GrafitoError(f"cannot resume: {path} not found (init_from=resume continues a run in out_dir={out_dir})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise GrafitoError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise GrafitoError(f"{path}: not a training state this grafito resumes (format {found!r}, expected "
                           f"{STATE_FORMAT!r}); start a new run from its weights with init_from={Path(out_dir)}")
    return state


def check_resume(state, config, dtype, accumulation, world, objective_keys=()):
    """Refuse a resume whose settings would not continue the same run: the objective, the
    settings in RESUME_FIXED and the objective's own (objective_keys), the micro-batches per step
    (the process count rounds them), and the precision the run trained in (dtype=auto may
    resolve differently on another GPU)."""
    saved = state["config"]
    saved_objective, objective = saved.get("objective", "sft"), config.get("objective", "sft")  # older states: SFT
    if saved_objective != objective:  # an SFT run cannot continue as DPO, nor the other way
        raise GrafitoError(f"cannot resume with different objective ({saved_objective!r} -> {objective!r}); start a "
                           f"new run from its weights with init_from={config['out_dir']}")
    changed = [k for k in (*RESUME_FIXED, *objective_keys) if saved.get(k, config[k]) != config[k]]
    if changed:
        raise GrafitoError("cannot resume with different " + ", ".join(f"{k} ({saved.get(k)!r} -> {config[k]!r})"
                                                                       for k in changed))
    if state["accumulation"] != accumulation:
        raise GrafitoError(f"cannot resume: the run took {state['accumulation']} micro-batches per step over "
                           f"{state['world']} process(es); with {world} it would take {accumulation} (rounded to a "
                           f"multiple of the process count). Resume with {state['world']} process(es)")
    trained_in = state.get("resolved_dtype", dtype)
    if trained_in != dtype:
        raise GrafitoError(f"cannot resume: the run trained in {trained_in} (dtype={saved.get('dtype')}), and on this "
                           f"device {config['dtype']} means {dtype}; resume with --dtype={trained_in} on a device that "
                           f"runs it, or start a new run from its weights with init_from={config['out_dir']}")


def open_log(out_dir, step):
    """log.jsonl for appending. A new run starts it afresh; a resume first cuts it back to the
    checkpoint's step (what an interrupted run logged after it is run and logged again),
    through a temporary file, so a crash mid-rewrite loses no history."""
    path = Path(out_dir) / "log.jsonl"
    if step == 0 or not path.exists():
        return open(path, "w")
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line cut short by a crash
            continue
        if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".log.jsonl.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return open(path, "a")


def plot_log(out_dir, measure):
    """out_dir/loss.png: the logged train and val losses (measure names the axis), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for out_dir/loss.png)")
        return
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    train_points = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train")
    if val_points:
        ax.plot(*zip(*val_points), marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel(measure)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png", dpi=120)
    print(f"loss curve: {Path(out_dir) / 'loss.png'}")


class RunLock:
    """An exclusive lock on out_dir/.lock for the life of a run. The kernel drops it when the
    process ends, however it ends, so a crashed run never leaves out_dir locked."""

    def __init__(self, out_dir):
        import fcntl

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(out_dir) / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise GrafitoError(f"{out_dir} is in use by a running training run ({owner}); wait for it to finish, "
                               f"or choose another out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()

    def release(self):
        self.file.close()
