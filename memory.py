"""What a training step needs in each GPU's memory, worked out from the model's shape before
anything is loaded: the plan (train.py --plan prints it, and train.py's memory check before a
run takes its total for the run's own strategy).

    python train.py config/emerald_003.py --plan                  # 1 GPU, or torchrun's WORLD_SIZE
    python train.py config/emerald_003.py --plan --plan_world=8   # as 8 processes would run it

Two ways to spread a run over N processes: ddp, every GPU holds the whole model, its
gradients and AdamW state (one process is this with N = 1); fsdp, torch's fully_shard
(distributed.shard_model), every GPU holds 1/N of them, plus the units being gathered. Each
with or without activation checkpointing (every block's activations recomputed in the backward
instead of kept). The parts, in bytes per GPU, with P the parameters, T the parameters trained
(P, or LoRA's adapters), b the bytes of a 16-bit or float32 activation:

- weights: ddp 4 P (float32 master weights); LoRA keeps its frozen block matrices in the
  16-bit dtype (2 bytes). fsdp 4 P / N, plus the units gathered in the compute dtype: the
  root (embeddings, tied output layer, final LayerNorm) for the whole step and two blocks
  (the running one and the next, prefetched).
- gradients: 4 T (float32); DDP adds its gradient buckets, 4 T, with more than one process.
  fsdp 4 T / N, plus the gathered units' whole gradients (compute dtype) and their float32
  reduce-scatter buffers, plus, when a process runs several micro-batches a step and they are
  not reduced one by one, whole float32 gradients kept between them (4 T).
- optimizer: AdamW's two float32 moments, 8 T (/ N with fsdp).
- activations of one micro-batch of S tokens (R rows of block_size), per block and token: the
  inputs of both LayerNorms (4 bytes each: the residual stream is float32), q, k, v and the
  attention output (SDPA's kernels keep no T x T scores), GELU's input (4 C wide), and, where the
  matrices are trained, every matmul's input (LoRA's frozen ones need none): 36 bytes a channel
  in 16 bits, 64 in float32. Each adapter adds its float32 input (and c_attn's its 16-bit update
  of each adapted third); dropout adds 1-byte masks (CPUs keep them in the input's dtype). With
  checkpointing a block keeps only its input (4 C bytes a token) and one block is recomputed at
  a time. Then the backward's working set (one block's activations again), the final
  LayerNorm, and the fused output layer (loss.py): its
  gradient for the hidden states (4 C a token), for a trained output layer a float32 gradient of
  the whole embedding, one chunk of 1024 rows of logits, and the 16-bit copy of the weight.
  Full fine-tuning in 16 bits without fsdp adds autocast's 16-bit copies of the block matrices,
  which the backward frees layer by layer like activations.
- total: the backward frees each block's activations as it makes that block's gradients, so a
  step's peak is weights + optimizer + the larger of (activations + the gradients held from
  before: DDP's buckets, earlier micro-batches') and all the gradients.

Not counted: the CUDA context and the allocator's slack (GPU_RESERVED is kept free when
saying what fits), torch.compile's own choices (it usually keeps less), the data and the
DPO reference's values (small). The figures are GiB (2^30 bytes).
"""

import math
from dataclasses import dataclass

GPU_SIZES = (16, 24, 40, 80)  # GB of the GPUs the plan speaks of
GPU_RESERVED = 2 ** 30  # the CUDA context and allocator slack: left free when saying what fits
STRATEGIES = ("ddp", "fsdp")
LOSS_CHUNK_ROWS = 1024  # loss.CHUNK_ROWS: rows of logits alive at once
GIB = 2 ** 30


@dataclass(frozen=True)
class Parameters:
    """A GPT's parameter counts by where FSDP puts them: one block's, the root's (embeddings,
    final LayerNorm), and the LoRA adapters of one block (0 without LoRA)."""
    block: int
    root: int
    embedding: int  # the token embedding alone (also the output layer): padded vocabulary x n_embd
    block_adapters: int
    n_layer: int

    @property
    def total(self):
        return self.n_layer * (self.block + self.block_adapters) + self.root

    @property
    def adapters(self):
        return self.n_layer * self.block_adapters


def parameters(config, lora=None):
    """Parameters of a GPTConfig, with LoRA's adapters when lora (a lora.LoRAConfig) is given."""
    C, F = config.n_embd, config.mlp_width
    norm = 2 * C if config.bias else C  # a LayerNorm's weight (and bias)
    matrices = 4 * C * C + 2 * C * F  # c_attn (3 C x C), attention c_proj, c_fc, mlp c_proj
    biases = (3 * C + C + F + C) if config.bias else 0
    embedding = config.padded_vocab_size * C
    adapters = 0
    if lora is not None:
        qkv = [t for t in lora.targets if t in ("q", "k", "v")]
        adapters += len(qkv) * lora.r * (C + C)  # each third of c_attn: A (r x C), B (C x r)
        adapters += lora.r * (C + C) if "attn_proj" in lora.targets else 0
        adapters += lora.r * (C + F) if "mlp_fc" in lora.targets else 0
        adapters += lora.r * (F + C) if "mlp_proj" in lora.targets else 0
    return Parameters(block=matrices + biases + 2 * norm, n_layer=config.n_layer,
                      root=embedding + config.block_size * C + norm, embedding=embedding, block_adapters=adapters)


@dataclass(frozen=True)
class StepMemory:
    """Bytes per GPU of one training step, by part: each part's own peak. held_gradients: the
    gradients already there when a micro-batch's backward starts (DDP's buckets, earlier
    micro-batches'); the others are made as the backward frees the activations, so the step's
    peak (total) counts the larger of activations and gradients, not both."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    held_gradients: int = 0

    @property
    def total(self):
        return self.weights + self.optimizer + max(self.held_gradients + self.activations, self.gradients)


def block_activations(config, lora, dtype, dropout):
    """Bytes a transformer block keeps per token for its backward (its saved activations)."""
    C, F = config.n_embd, config.mlp_width
    b = 4 if dtype == "float32" else 2
    trained = lora is None
    # LayerNorm inputs, q k v, the attention output (also attention c_proj's input), GELU's input
    block = 4 * C + 3 * C * b + C * b + 4 * C + F * b
    if trained:  # the inputs of c_attn, c_fc and mlp c_proj (for their weight gradients)
        block += 2 * C * b + F * b
    if dropout > 0:
        block += 2 * C  # the residual dropouts' masks
    if lora is not None:
        widths = {"attn": C, "attn_proj": C, "mlp_fc": C, "mlp_proj": F}
        adapted = {"attn" if t in ("q", "k", "v") else t for t in lora.targets}
        # an adapter keeps its input in float32 (and dropout's mask); a float32 attention output without
        # dropout is one SDPA keeps already
        shared = b == 4 and lora.dropout == 0
        block += sum((4 + (1 if lora.dropout > 0 else 0)) * widths[t] for t in adapted
                     if not (t == "attn_proj" and shared))
        block += sum(b * C for t in lora.targets if t in ("q", "k", "v"))  # c_attn's thirds: their updates
    return block


def activation_bytes(config, lora, tokens, dtype, dropout, checkpointing, strategy):
    """Bytes of one micro-batch's activations (and the output layer's working memory) in one process."""
    C, F, L = config.n_embd, config.mlp_width, config.n_layer
    b = 4 if dtype == "float32" else 2
    trained = lora is None
    block = block_activations(config, lora, dtype, dropout)
    kept = 4 * C if checkpointing else block  # a checkpointed block keeps its input only
    layers = L * kept * tokens + (block * tokens if checkpointing else 0) + block * tokens  # + recompute, backward
    head = 4 * C * tokens + 4 * C * tokens  # the final LayerNorm's input, the gradient for the hidden states
    vocab = config.padded_vocab_size
    gradient_copy = 2 if dtype == "bfloat16" else 0  # float16 and float32 take the softmax's float32 as is
    head += min(tokens, LOSS_CHUNK_ROWS) * vocab * (b + 4 + gradient_copy)  # a chunk's logits, softmax, gradient
    if trained:
        head += 4 * vocab * C  # the output layer's float32 weight gradient, made in the forward pass
    casts = 0
    if b == 2 and strategy == "ddp":  # fsdp gathers the weights in 16 bits already
        casts = 2 * vocab * C  # the output layer's weight, cast for its matmuls
        if trained:  # autocast's copies of the block matrices, kept for the backward (LoRA's frozen ones are 16-bit)
            casts += 2 * L * (4 * C * C + 2 * C * F)
    return layers + head + casts


def step_memory(config, lora, rows, block_size, dtype, world, strategy, checkpointing=False, dropout=0.0,
                micro_batches=1, reduce_every_micro_batch=False):
    """StepMemory per GPU for rows x block_size tokens per micro-batch, micro_batches of them per
    process and step, under strategy ('ddp' or 'fsdp') over world processes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {STRATEGIES}")
    p = parameters(config, lora)
    b = 4 if dtype == "float32" else 2
    trained = p.adapters if lora is not None else p.total
    activations = activation_bytes(config, lora, rows * block_size, dtype, dropout, checkpointing, strategy)
    if strategy == "ddp":
        if lora is not None:  # frozen block matrices and biases in the compute dtype, the rest float32
            frozen_linears = config.n_layer * (p.block - _norms(config))
            weights = b * frozen_linears + 4 * (p.total - frozen_linears)
        else:
            weights = 4 * p.total
        buckets = 4 * trained if world > 1 else 0  # DDP's copy of the gradients, allocated once
        held = buckets + (4 * trained if micro_batches > 1 else 0)
        return StepMemory(weights, 4 * trained + buckets, 8 * trained, activations, held)
    gathered = p.root + 2 * (p.block + p.block_adapters)  # the root and two blocks at a time
    gathered_trained = gathered if lora is None else 2 * p.block_adapters
    weights = math.ceil(4 * p.total / world) + b * gathered
    shards = math.ceil(4 * trained / world)
    gradients = shards + (b + 4) * gathered_trained  # + the gathered units' gradients, their reduce-scatter buffers
    held = shards if micro_batches > 1 else 0
    if world > 1 and micro_batches > 1 and not reduce_every_micro_batch:
        gradients += 4 * trained  # whole gradients, accumulated until the step's last micro-batch
        held = 4 * trained
    return StepMemory(weights, gradients, math.ceil(8 * trained / world), activations, held)


def _norms(config):
    return 2 * (2 * config.n_embd if config.bias else config.n_embd)


def fits(total):
    """The GPU sizes (GB, as sold: GiB of memory) that hold total bytes with GPU_RESERVED to spare."""
    return [size for size in GPU_SIZES if total + GPU_RESERVED <= size * GIB]


def plan(config, lora, rows, block_size, dtype, world, dropout=0.0, micro_batches=1, reduce_every_micro_batch=False):
    """{(strategy, checkpointing): StepMemory} for every strategy, with and without checkpointing."""
    return {(strategy, checkpointing): step_memory(config, lora, rows, block_size, dtype, world, strategy,
                                                   checkpointing, dropout, micro_batches, reduce_every_micro_batch)
            for strategy in STRATEGIES for checkpointing in (False, True)}


def format_plan(table, config, lora, rows, block_size, dtype, world, micro_batches, chosen=None,
                reduce_every_micro_batch=False):
    """The plan as text: one line per strategy and checkpointing, chosen (strategy, checkpointing) marked."""
    p = parameters(config, lora)
    trained = f"LoRA r={lora.r} on {','.join(lora.targets)}, {p.adapters / 1e6:.2f}M trained" if lora else "all trained"
    lines = [f"memory plan: {p.total / 1e6:,.1f}M parameters ({trained}), {dtype}, {rows} rows x {block_size} "
             f"tokens per micro-batch, {micro_batches} micro-batch(es) per process and step, {world} GPU(s)",
             f"{'':24}{'weights':>10}{'gradients':>11}{'optimizer':>11}{'activations':>13}{'total':>10}  fits (GB)"]
    for (strategy, checkpointing), m in table.items():
        name = strategy + (" + checkpointing" if checkpointing else "")
        mark = " <- this run" if (strategy, checkpointing) == chosen else ""
        sizes = ", ".join(map(str, fits(m.total))) or "none of " + "/".join(map(str, GPU_SIZES))
        lines.append(f"{name:24}" + "".join(f"{v / GIB:>{w}.2f}" for v, w in
                                             ((m.weights, 10), (m.gradients, 11), (m.optimizer, 11),
                                              (m.activations, 13), (m.total, 10)))
                     + f"  {sizes}{mark}")
    lines.append(f"GiB per GPU. total: the step's peak (the backward frees activations as it makes gradients).\n"
                 f"'fits' leaves {GPU_RESERVED / GIB:.0f} GiB for the CUDA context and allocator slack. ddp: every GPU "
                 f"holds the whole model;\nfsdp: --fsdp=True under torchrun; checkpointing: "
                 f"--activation_checkpointing=True.\nmemory.py says what each part counts.")
    if world > 1 and micro_batches > 1 and not reduce_every_micro_batch:
        whole = 4 * (p.adapters if lora is not None else p.total)
        lines.append(f"fsdp keeps whole float32 gradients ({whole / GIB:.1f} GiB) between a GPU's {micro_batches} "
                     f"micro-batches;\n--fsdp_reduce_every_micro_batch=True reduces each at once (more traffic).")
    return "\n".join(lines)


def run_arguments(config, model_config, lora, rows_per_item, world, accumulation, dtype=None):
    """plan()'s arguments for a train.py config (dtype: the resolved one; auto plans in 16 bits)."""
    dtype = dtype or ("bfloat16" if config["dtype"] == "auto" else config["dtype"])
    return dict(config=model_config, lora=lora, rows=config["batch_size"] * rows_per_item,
                block_size=config["block_size"], dtype=dtype, world=world, dropout=config["dropout"],
                micro_batches=accumulation // world, reduce_every_micro_batch=config["fsdp_reduce_every_micro_batch"])


def for_run(config, model_config, lora, rows_per_item, world, accumulation, dtype=None):
    """StepMemory of the run a train.py config describes, under its own strategy and checkpointing."""
    return step_memory(strategy="fsdp" if config["fsdp"] else "ddp", checkpointing=config["activation_checkpointing"],
                       **run_arguments(config, model_config, lora, rows_per_item, world, accumulation, dtype))


def describe_run(config, model_config, lora, rows_per_item, world, accumulation):
    """train.py --plan's text for a config."""
    arguments = run_arguments(config, model_config, lora, rows_per_item, world, accumulation)
    chosen = ("fsdp" if config["fsdp"] else "ddp", config["activation_checkpointing"])
    return format_plan(plan(**arguments), chosen=chosen, **{k: arguments[k] for k in (
        "config", "lora", "rows", "block_size", "dtype", "world", "micro_batches", "reduce_every_micro_batch")})
