"""Fine-tune GPT-2 into a grafito chat model, fully or with LoRA (or train a small one from scratch).

    python train.py config/ruby_002.py                           # gpt2 124M on grafito-25k
    python train.py config/cpu_tiny.py                           # the whole loop on 2 CPU cores, minutes
    python train.py config/ruby_002.py --init_from=resume        # continue out_dir's last checkpoint
    torchrun --standalone --nproc_per_node=8 train.py config/obsidian_000.py   # DDP

The loss is taken only on supervised tokens (answers and their end-of-text) and the output
layer runs only at those positions. Batches are rows of whole conversations packed to
block_size. The checkpoint format is described in checkpoint.py; options and defaults
are DEFAULTS below (python train.py --help lists them).
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import checkpoint
import data
import lora
from common import (DTYPES, GrafitoError, autocast, peak_flops, readable_dir, resolve_device, resolve_dtype, run_cli,
                    trim_cpu_memory)
from configurator import format_config, load_config
from model import GPT, GPTConfig, training_flops

DEFAULTS = dict(
    # where things go and how often
    out_dir="out",
    overwrite=False,  # start a new run in an out_dir that holds one: its checkpoints, merged/ and log are deleted first
    init_from="gpt2",  # scratch | gpt2, gpt2-medium, ... | hub repo id | local folder | resume
    eval_interval=100,  # steps between evaluations; each one writes out_dir/ckpt (and best/ on improvement)
    eval_iters=0,  # val batches per evaluation, 0 for the whole val split
    log_interval=10,
    early_stop_patience=0,  # stop after this many evaluations without a better val loss; 0 never
    plot=True,  # out_dir/loss.png at the end, if matplotlib is installed
    # data
    dataset="grafito25k",  # folder under data/ or a path to a prepared folder
    block_size=1024,
    batch_size=8,  # rows per micro-batch, per process
    gradient_accumulation_steps=1,  # micro-batches per step over all processes (nanoGPT's meaning)
    tokens_per_step=0,  # > 0: choose gradient_accumulation_steps to reach this many tokens per step
    max_iters=1000,
    epochs=0.0,  # > 0: sets max_iters to this many passes over the packed training rows (the later of the two wins)
    # model, for init_from=scratch
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=True,
    # LoRA: lora_r > 0 freezes the model and trains adapters only
    lora_r=0,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_targets="q,v",  # comma-separated: q, k, v, attn_proj, mlp_fc, mlp_proj
    lora_merge=False,  # also write out_dir/merged: the best adapter merged into its base
    # optimizer: AdamW, warmup then cosine decay (or constant)
    learning_rate=1e-4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 disables clipping
    lr_schedule="cosine",  # cosine | constant
    warmup_iters=50,
    lr_decay_iters=0,  # cosine reaches min_lr here; 0 means max_iters
    min_lr=1e-5,
    # system
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto (bf16 on CPUs and Ampere+ GPUs, fp16 on older GPUs) | bfloat16 | float16 | float32
    compile=False,  # torch.compile the model
    seed=1337,
    backend="auto",  # DDP backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
)
# keys that must not change when resuming, or the run would not continue the same way
RESUME_FIXED = ("dataset", "block_size", "batch_size", "gradient_accumulation_steps", "tokens_per_step", "seed",
                "eval_iters", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "n_layer", "n_head", "n_embd", "bias")


def load_train_config(argv=None):
    """DEFAULTS, then config files and --key=value overrides; of epochs and max_iters the later wins."""
    return load_config(DEFAULTS, argv, rivals=[("epochs", "max_iters")])


def validate(config):
    def need(ok, key, rule):
        if not ok:
            raise GrafitoError(f"config: {key} = {config[key]!r} is invalid: {rule}")

    for key in ("block_size", "batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "n_layer", "n_head", "n_embd"):
        need(config[key] >= 1, key, "must be at least 1")
    for key in ("eval_iters", "early_stop_patience", "tokens_per_step", "warmup_iters", "lr_decay_iters", "lora_r"):
        need(config[key] >= 0, key, "must not be negative")
    for key in ("out_dir", "dataset", "init_from"):
        need(config[key].strip() != "", key, "must not be empty")
    need(not Path(config["out_dir"]).exists() or Path(config["out_dir"]).is_dir(), "out_dir", "is a file, not a folder")
    need(config["max_iters"] >= 1 or config["epochs"] > 0, "max_iters", "must be at least 1 (or set epochs)")
    need(config["epochs"] >= 0, "epochs", "must not be negative")
    need(config["learning_rate"] > 0, "learning_rate", "must be positive")
    need(0 <= config["min_lr"] <= config["learning_rate"], "min_lr", "must be between 0 and learning_rate")
    need(config["weight_decay"] >= 0, "weight_decay", "must not be negative")
    need(0 <= config["beta1"] < 1, "beta1", "must be in [0, 1)")
    need(0 <= config["beta2"] < 1, "beta2", "must be in [0, 1)")
    need(config["grad_clip"] >= 0, "grad_clip", "must not be negative (0 disables clipping)")
    need(config["lr_schedule"] in ("cosine", "constant"), "lr_schedule", "cosine or constant")
    need(0 <= config["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(config["backend"] in ("auto", "nccl", "gloo"), "backend", "auto, nccl or gloo")
    need(config["n_embd"] % config["n_head"] == 0, "n_embd", f"must be divisible by n_head={config['n_head']}")
    need(not (config["lora_r"] and config["init_from"] == "scratch"), "lora_r",
         "LoRA adapts a pretrained model; use init_from=gpt2 (or another) or lora_r=0")
    if config["lora_r"]:
        lora_settings(config)  # raises on unknown targets


def lora_settings(config):
    targets = tuple(t.strip() for t in config["lora_targets"].split(",") if t.strip())
    return lora.LoRAConfig(r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"], targets=targets)


# ----------------------------------------------------------------------------- set-up

def setup_distributed(config):
    """(rank, local_rank, world_size, device) under torchrun, else (0, 0, 1, device)."""
    device = resolve_device(config["device"])
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    import torch.distributed as dist

    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = device.startswith("cuda")
    backend = config["backend"] if config["backend"] != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise GrafitoError("backend=nccl runs on CUDA GPUs only; use backend=gloo (or auto) with device=cpu")
    dist.init_process_group(backend=backend)
    if on_gpu:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, local_rank, world, device


def build_model(config, device, dtype, resume_state):
    """(model, base model name for adapters) for init_from; LoRA applied when lora_r > 0."""
    init_from = config["init_from"]
    if init_from == "resume":
        folder = readable_dir(Path(config["out_dir"]) / checkpoint.LATEST)
        base_model = resume_state["base_model"]
        if checkpoint.is_adapter(folder):
            model = checkpoint.load_weights(folder, merge=False, dropout=config["dropout"])
        else:  # a scratch run without biases was saved with zero biases; rebuild it without them
            no_bias = {"bias": False} if base_model == "scratch" and not config["bias"] else {}
            model = GPT.from_pretrained(folder, dropout=config["dropout"], **no_bias)
    elif init_from == "scratch":
        model = GPT(GPTConfig(block_size=config["block_size"], n_layer=config["n_layer"], n_head=config["n_head"],
                              n_embd=config["n_embd"], dropout=config["dropout"], bias=config["bias"]))
        base_model = "scratch"
    else:  # a GPT-2 name, a hub repo id, a weights folder or an earlier run's out_dir (adapters merged)
        source = checkpoint.resolve_model_source(init_from)
        model = checkpoint.load_model(source, dropout=config["dropout"])
        base_model = str(source.resolve()) if isinstance(source, Path) else init_from
        if config["lora_r"]:
            lora.apply_lora(model, lora_settings(config))
    if lora.lora_layers(model) and dtype in ("bfloat16", "float16"):
        lora.cast_frozen_linears(model, DTYPES[dtype])
    if config["block_size"] > model.config.block_size:
        raise GrafitoError(f"config: block_size = {config['block_size']} is larger than the model's context "
                           f"({model.config.block_size} positions)")
    return model.to(device), base_model


def make_optimizer(model, config, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases and LayerNorms
    fused = device.startswith(("cuda", "cpu"))  # one kernel for the whole update (CPU support: torch >= 2.4)
    return torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]), fused=fused)


def learning_rate(step, config, max_iters):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (or constant)."""
    lr, warmup = config["learning_rate"], config["warmup_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if config["lr_schedule"] == "constant":
        return lr
    decay_iters = config["lr_decay_iters"] or max_iters
    if step >= decay_iters:
        return config["min_lr"]
    progress = (step - warmup) / max(1, decay_iters - warmup)
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - config["min_lr"])


@torch.no_grad()
def masked_val_loss(model, batches, device, dtype):
    """Mean cross-entropy over every supervised token of (x, y) batches (eval mode, autocast)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in batches:
        with autocast(device, dtype):
            _, loss_sum = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), loss_reduction="sum")
        total += loss_sum.float()
        count += int((y >= 0).sum())
    model.train(was_training)
    return total.item() / max(count, 1)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the run

class Trainer:
    def __init__(self, config):
        self.config = config
        self.rank, self.local_rank, self.world, self.device = setup_distributed(config)
        self.master = self.rank == 0
        self.dtype = resolve_dtype(config["dtype"], self.device)
        self.out_dir = Path(config["out_dir"])
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(config["seed"])

        resume_state = None
        if config["init_from"] != "resume":
            self._claim_out_dir()
        else:
            resume_state = checkpoint.load_train_state(self.out_dir)
            changed = [k for k in RESUME_FIXED if resume_state["config"].get(k) != config[k]]
            if changed:
                raise GrafitoError("cannot resume with different " + ", ".join(
                    f"{k} ({resume_state['config'][k]!r} -> {config[k]!r})" for k in changed))
        self.model, self.base_model = build_model(config, self.device, self.dtype, resume_state)
        self.lora = bool(lora.lora_layers(self.model))
        # taken now, as training begins: a base folder that changes later makes the adapter refuse to load
        self.base_fingerprint = checkpoint.base_fingerprint_of(self.base_model) if self.lora else None

        self.train_split = data.load_split(config["dataset"], "train")
        self.val_split = data.load_split(config["dataset"], "val")
        meta = data.load_meta(config["dataset"])
        if meta["vocab_size"] > self.model.config.vocab_size:
            raise GrafitoError(f"dataset vocab {meta['vocab_size']} exceeds the model's {self.model.config.vocab_size}")
        self.sampler = data.PackedBatches(self.train_split, config["block_size"], seed=config["seed"])
        self.accum = self._accumulation_steps()
        if resume_state is not None:
            self._check_same_accumulation(resume_state)
        self.rows_per_step = config["batch_size"] * self.accum
        rows_per_epoch = len(self.sampler.rows_of_epoch(0))
        self.max_iters = (math.ceil(config["epochs"] * rows_per_epoch / self.rows_per_step) if config["epochs"] > 0
                          else config["max_iters"])
        self.val_batches = self._val_batches()

        self.optimizer = make_optimizer(self.model, config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == "float16")
        self.step, self.best_val, self.evals_without_gain = 0, float("inf"), 0
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.scaler.load_state_dict(resume_state["scaler"])
            self.sampler.load_state_dict(resume_state["sampler"])
            self.step, self.best_val = resume_state["step"], resume_state["best_val"]
            self.evals_without_gain = resume_state["evals_without_gain"]
            set_rng_state(resume_state["rng"])

        self.raw_model = self.model
        if config["compile"]:
            self.model = torch.compile(self.model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model, device_ids=[self.local_rank] if self.device.startswith("cuda") else None)
        self.peak = peak_flops(self.device, self.dtype)
        if self.master:
            self._announce(rows_per_epoch)

    def _claim_out_dir(self):
        """A new run gets an out_dir without another run's files: refused if it holds a run,
        emptied of that run's files (rank 0, before anyone reads or writes) with overwrite."""
        run_files = [self.out_dir.resolve() / name for name in (checkpoint.LATEST, checkpoint.BEST, checkpoint.MERGED)]
        run_files += [path.with_name(path.name + ".old") for path in run_files]
        source = checkpoint.resolve_model_source(self.config["init_from"])
        if isinstance(source, Path) and set(run_files) & {source.resolve(), *source.resolve().parents}:
            raise GrafitoError(f"init_from={self.config['init_from']} lies inside out_dir={self.out_dir}: this run "
                               f"would overwrite the weights it starts from. Continue that run with init_from=resume, "
                               f"or choose another out_dir")
        found = [path for path in run_files if path.exists()]
        if found and not self.config["overwrite"]:
            raise GrafitoError(f"{self.out_dir} already holds a run ({found[0]}); continue it with init_from=resume, "
                               f"choose another out_dir, or pass --overwrite to start a new run there")
        if self.master:
            for path in found:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            for name in ("log.jsonl", "loss.png"):
                (self.out_dir / name).unlink(missing_ok=True)
        if self.world > 1:
            torch.distributed.barrier()

    def _accumulation_steps(self):
        """Micro-batches per step over all processes, rounded up to a multiple of the process count."""
        c = self.config
        if c["tokens_per_step"]:
            steps = math.ceil(c["tokens_per_step"] / (c["batch_size"] * c["block_size"]))
        else:
            steps = c["gradient_accumulation_steps"]
        rounded = math.ceil(steps / self.world) * self.world
        if rounded != steps and self.master:
            print(f"note: {steps} micro-batches per step rounded up to {rounded}, a multiple of the "
                  f"{self.world} processes (every process runs the same number)")
        return rounded

    def _check_same_accumulation(self, resume_state):
        """A step must take as many rows after a resume as before, or the run is not the same run."""
        saved, saved_world = resume_state.get("accumulation"), resume_state.get("world")
        if saved is not None and saved != self.accum:
            raise GrafitoError(f"cannot resume: the run took {saved} micro-batches per step over {saved_world} "
                               f"process(es); with {self.world} it would take {self.accum} (rounded to a multiple "
                               f"of the process count). Resume with {saved_world} process(es)")

    def _val_batches(self):
        if self.val_split.num_conversations == 0:  # prepared with --val_fraction 0
            print("(no val split: evaluations only save checkpoints, and best/ follows the latest)")
            return []
        return data.eval_batches(self.val_split, self.config["block_size"], self.config["batch_size"],
                                 self.config["eval_iters"])

    def _announce(self, rows_per_epoch):
        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "train_config.json").write_text(json.dumps(c, indent=2) + "\n")
        print("config:\n" + format_config(c))
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        print(f"model: {self.raw_model.num_params() / 1e6:.1f}M parameters ({trainable / 1e6:.2f}M trainable"
              f"{', LoRA' if self.lora else ''}), device {self.device}, dtype {self.dtype}, {self.world} process(es)")
        tokens_per_step = self.rows_per_step * c["block_size"]
        print(f"data: {self.train_split.num_conversations:,} train conversations in {rows_per_epoch:,} rows of "
              f"{c['block_size']} tokens ({self.sampler.packing_efficiency():.1%} filled), "
              f"{len(self.val_batches)} val batches")
        cut, cut_tokens = self.sampler.overlong()
        if cut:
            print(f"note: {cut:,} train conversations are longer than a row ({c['block_size'] + 1} tokens) and lose "
                  f"their last {cut_tokens:,} tokens ({cut_tokens / len(self.train_split.tokens):.1%} of the split); "
                  f"prepare with --block_size={c['block_size']} to drop them or cut them at a turn boundary instead")
        print(f"steps: {self.max_iters:,} of {self.rows_per_step} rows ({tokens_per_step:,} tokens, gradient "
              f"accumulation {self.accum}) = {self.max_iters * self.rows_per_step / rows_per_epoch:.2f} epochs")

    # ------------------------------------------------------------------------- one step

    def _to_device(self, array):
        tensor = torch.from_numpy(array)
        if self.device.startswith("cuda"):
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def train_step(self):
        """One optimizer step over this process's micro-batches; returns (loss sum, supervised count)."""
        rows = self.sampler.next_rows(self.rows_per_step)
        per_rank = len(rows) // self.world
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        size = self.config["batch_size"]
        batches = [self.sampler.batch(mine[i:i + size]) for i in range(0, len(mine), size)]
        supervised = torch.tensor(float(sum((y >= 0).sum() for _, y in batches)), device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(supervised)
        # every token weighs the same in the step's loss, wherever it landed (DDP averages over processes)
        scale = self.world / supervised.clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.model.no_sync() if self.world > 1 and not last else nullcontext()
            with sync:
                with autocast(self.device, self.dtype):
                    _, micro_loss = self.model(self._to_device(x), self._to_device(y), loss_reduction="sum")
                self.scaler.scale(micro_loss * scale).backward()
            loss_sum += micro_loss.detach()
        if self.config["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.raw_model.parameters() if p.requires_grad],
                                           self.config["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, supervised

    def evaluate(self):
        return masked_val_loss(self.raw_model, self.val_batches, self.device, self.dtype)

    # ------------------------------------------------------------------------- the loop

    def run(self):
        from tqdm import tqdm

        c = self.config
        log = self._open_log() if self.master else None
        bar = tqdm(total=self.max_iters, initial=self.step, disable=not self.master, unit="step", dynamic_ncols=True)
        window_loss, window_sup = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        if self.step == 0:
            self._evaluate_on_master(log, bar, train_loss=None)
        stop = False
        while self.step < self.max_iters and not stop:
            lr = learning_rate(self.step, c, self.max_iters)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, supervised = self.train_step()
            self.step += 1
            window_loss += loss_sum
            window_sup += supervised
            window_steps += 1
            bar.update(1)
            at_eval = self.step % c["eval_interval"] == 0 or self.step == self.max_iters
            if self.step % c["log_interval"] == 0 or at_eval:
                trim_cpu_memory()
                train_loss = self._train_loss(window_loss, window_sup)
                elapsed = time.perf_counter() - window_start
                self._log_step(log, bar, train_loss, lr, window_steps, window_sup.item(), elapsed)
                window_loss.zero_(), window_sup.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if at_eval:
                stop = self._evaluate_on_master(log, bar, train_loss)
                window_start = time.perf_counter()  # evaluation time is not training throughput
        bar.close()
        if self.master:
            self._finish(log)

    def _open_log(self):
        """log.jsonl: started afresh by a new run; on resume, cut back to the checkpoint's step
        (steps logged after it, before an interruption, are run again and logged again)."""
        path = self.out_dir / "log.jsonl"
        if self.step == 0 or not path.exists():
            return open(path, "w")
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # e.g. a line cut short by a crash
                continue
            if isinstance(row, dict) and row.get("step", 0) <= self.step:
                kept.append(line + "\n")
        path.write_text("".join(kept))
        return open(path, "a")

    def _train_loss(self, window_loss, window_sup):
        total = window_loss.clone()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        loss = total.item() / max(window_sup.item(), 1)
        if not math.isfinite(loss):
            raise GrafitoError(f"training loss became {loss} by step {self.step}; stopped, and the last good "
                               f"checkpoint in {self.out_dir / checkpoint.LATEST} is untouched. Try a lower "
                               f"learning_rate, grad_clip, or bfloat16 instead of float16")
        return loss

    def _log_step(self, log, bar, train_loss, lr, steps, supervised, elapsed):
        if not self.master:
            return
        c = self.config
        tokens = steps * self.rows_per_step * c["block_size"]
        flops = training_flops(self.raw_model.config, tokens, supervised, c["block_size"], lora=self.lora)
        mfu = flops / elapsed / self.peak if self.peak else None
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}",
                        mfu=f"{mfu:.1%}" if mfu is not None else "unknown")
        log.write(json.dumps({"step": self.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens / elapsed,
                              "mfu": mfu, "time": time.time()}) + "\n")
        log.flush()

    def _evaluate_and_save(self, log, bar, train_loss):
        """Evaluate, write the latest checkpoint and, on improvement, best/; True means stop early."""
        if self.val_batches:
            val_loss = self.evaluate()
            if not math.isfinite(val_loss):
                raise GrafitoError(f"validation loss became {val_loss} at step {self.step}; stopped without saving")
            improved = self.step > 0 and val_loss < self.best_val  # step 0 is the starting model: a reference
            if improved:
                self.best_val, self.evals_without_gain = val_loss, 0
            elif self.step > 0:
                self.evals_without_gain += 1
            bar.write(f"step {self.step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}"
                      + (f", train loss {train_loss:.4f}" if train_loss is not None else "")
                      + (" (best)" if improved else ""))
            log.write(json.dumps({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                                  "time": time.time()}) + "\n")
            log.flush()
        else:
            improved = self.step > 0  # nothing to compare: best/ follows the latest weights
        if self.step > 0:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "sampler": self.sampler.state_dict(), "rng": rng_state(), "best_val": self.best_val,
                     "evals_without_gain": self.evals_without_gain, "config": self.config,
                     "base_model": self.base_model, "accumulation": self.accum, "world": self.world,
                     "format": "grafito-train-1"}
            if improved:  # before ckpt/: a resume from ckpt/ must never know of a best/ that is not there
                checkpoint.save_checkpoint(self.out_dir, checkpoint.BEST, self.raw_model, self.base_model,
                                           base_fingerprint=self.base_fingerprint)
            checkpoint.save_checkpoint(self.out_dir, checkpoint.LATEST, self.raw_model, self.base_model, state,
                                       base_fingerprint=self.base_fingerprint)
        patience = self.config["early_stop_patience"]
        if patience and self.evals_without_gain >= patience:
            bar.write(f"early stop: no better val loss in {patience} evaluations")
            return True
        return False

    def _evaluate_on_master(self, log, bar, train_loss):
        """Rank 0 evaluates and saves; every rank learns whether to stop, or that rank 0 failed
        (and says so, rather than dying in its next collective with a cryptic peer error)."""
        STOP, FAILED = 1, 2
        outcome, error = 0, None
        if self.master:
            try:
                outcome = STOP if self._evaluate_and_save(log, bar, train_loss) else 0
            except BaseException as err:
                outcome, error = FAILED, err
        if self.world > 1:
            tensor = torch.tensor(outcome, device=self.device)
            torch.distributed.broadcast(tensor, src=0)
            outcome = int(tensor.item())
        if error is not None:
            raise error
        if outcome == FAILED:
            raise GrafitoError(f"rank {self.rank}: stopping, rank 0 failed while evaluating or saving (see its message)")
        return outcome == STOP

    def _finish(self, log):
        log.close()
        best = (f"best val loss {self.best_val:.4f} (perplexity {math.exp(min(self.best_val, 50)):.2f})"
                if self.val_batches else "no val split")
        print(f"done: {self.step} steps, {best}; weights in {self.out_dir / checkpoint.BEST}")
        if self.lora and self.config["lora_merge"]:  # into a fresh float32 base, not the training copy
            merged = checkpoint.load_weights(self.out_dir / checkpoint.BEST)
            checkpoint.save_checkpoint(self.out_dir, checkpoint.MERGED, merged, self.base_model)
            print(f"merged adapter into the base: {self.out_dir / checkpoint.MERGED}")
        if self.config["plot"]:
            plot_losses(self.out_dir)


def plot_losses(out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for out_dir/loss.png)")
        return
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (masked)")
    if val:
        ax.plot(*zip(*val), marker="o", label="val (masked)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "loss.png", dpi=120)
    print(f"loss curve: {Path(out_dir) / 'loss.png'}")


def main():
    config = load_train_config()
    validate(config)
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        if trainer.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
