"""The GPU paths, on a CUDA machine (skipped elsewhere): the set-up every command runs, flash
attention in training, bf16 and fp16 steps, a compiled step that does not recompile, KV-cache
decoding and CUDA graphs, DPO compiled, NCCL. Precision follows dtype=auto (bf16 from compute
capability 8.0, fp16 below); what needs bf16 or the flash kernel skips below 8.0.
tools/gpu_check.sh runs this file and the GPU benchmarks in one go."""

import json
import subprocess
import sys

import pytest
import torch

import common
import engine
import train
from conftest import ROOT
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AMPERE = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_ampere = pytest.mark.skipif(not AMPERE, reason="bf16 and the flash kernel need compute capability 8.0+")
AUTO = "bfloat16" if AMPERE else "float16"  # what dtype=auto resolves to on this GPU
HALF = getattr(torch, AUTO)


@pytest.fixture
def gpt2_bpe():
    """The GPT-2 BPE files (tiktoken's cache); a GPU machine given a copy of the repository may lack them."""
    import tokenizer

    try:
        tokenizer.encode("x")
    except Exception as err:  # tiktoken could neither find nor download them
        pytest.skip(f"the GPT-2 BPE files are not here ({type(err).__name__}); fill the cache as "
                    f"docs/performance.md says, or set TIKTOKEN_CACHE_DIR")


def test_every_command_sets_up_on_the_current_gpu():
    device, dtype = common.setup("auto", "auto")
    assert device == f"cuda:{torch.cuda.current_device()}" and dtype == AUTO
    assert common.device_memory(device) == torch.cuda.get_device_properties(device).total_memory


def tiny_gpt(**config):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 256, **config})).cuda()


def masked_batch(B=4, T=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (B, T), generator=generator)
    y = torch.randint(0, 50257, (B, T), generator=generator)
    y[torch.rand(B, T, generator=generator) < 0.3 + 0.05 * seed] = -1
    return x.cuda(), y.cuda()


@needs_ampere
def test_training_runs_on_the_flash_attention_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_gpt(dropout=0.1)
    x, y = masked_batch()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)  # raises if no flash kernel accepts these inputs
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=needs_ampere), "float16"])
def test_mixed_precision_steps_lower_the_loss(dtype):
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    x, y = masked_batch()
    losses, scales = [], []
    for _ in range(10):
        with torch.autocast("cuda", dtype=getattr(torch, dtype)):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
    assert losses[-1] < 0.8 * losses[0] and scales == sorted(scales)


def test_a_compiled_training_step_compiles_once_for_every_supervised_count():
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_gpt()
    compiled = torch.compile(model)
    for step in range(6):
        x, y = masked_batch(seed=step)
        with torch.autocast("cuda", dtype=HALF):
            _, loss = compiled(x, y)
        loss.backward()
        if step == 0:
            torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.error_on_recompile = False


def test_kv_cache_decoding_equals_a_full_forward():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 50257, (2, 64), device="cuda")
    with torch.no_grad():
        full, _ = model(idx)
    model_engine = engine.Engine(model)
    cache = model_engine.new_cache(2, 64)
    model_engine.prefill(cache, [0, 1], idx[:, :9].tolist())
    steps = [model_engine.decode(cache, idx[:, t].tolist()) for t in range(9, 64)]
    assert (torch.stack(steps, dim=1) - full[:, 9:]).abs().max().item() < 1e-3


def test_compiled_decoding_with_cuda_graphs_gives_the_eager_tokens():
    model = tiny_gpt().eval()
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (7, 20)]
    greedy = engine.Sampling(temperature=0)
    eager = list(engine.Engine(model).generate(prompts, 24, greedy))
    assert list(engine.Engine(model, compile=True).generate(prompts, 24, greedy)) == eager


@pytest.fixture
def synthetic_dataset(tmp_path):
    """Conversations of random tokens with supervised answers (no tokenizer files needed)."""
    import data

    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(120):
        prompt, answer = torch.randint(0, 50000, (20,), generator=generator), torch.randint(0, 50000, (12,), generator=generator)
        rows.append((prompt.tolist() + answer.tolist() + [50256], [0] * 20 + [1] * 13))
    data.write_dataset(tmp_path / "synthetic", {"train": rows[:100], "val": rows[100:]}, {"dataset": "synthetic"})
    return tmp_path / "synthetic"


def test_train_py_runs_bf16_and_fp16_compiled_on_the_gpu(tmp_path, synthetic_dataset):
    tiny_dataset = synthetic_dataset
    for dtype in ("bfloat16", "float16") if AMPERE else ("float16",):
        config = train.load_train_config(["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64",
                                          "--block_size=128", "--batch_size=4", f"--dataset={tiny_dataset}",
                                          f"--out_dir={tmp_path / dtype}", "--device=cuda", f"--dtype={dtype}",
                                          "--max_iters=8", "--eval_interval=8", "--log_interval=1", "--plot=false",
                                          "--compile=true", "--learning_rate=3e-3"])
        train.check_config(config)
        train.train(config)
        rows = [json.loads(line) for line in open(tmp_path / dtype / "log.jsonl")]
        losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
        assert losses[8] < losses[1] and all(r["mfu"] is not None for r in rows if "mfu" in r)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_with_nccl_equal_one(tmp_path, synthetic_dataset):
    tiny_dataset = synthetic_dataset
    args = [str(ROOT / "train.py"), "--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64",
            "--block_size=128", "--batch_size=2", "--gradient_accumulation_steps=2", f"--dataset={tiny_dataset}",
            "--device=cuda", "--dtype=float32", "--max_iters=4", "--eval_interval=4", "--log_interval=1", "--plot=false"]
    one = subprocess.run([sys.executable, *args, f"--out_dir={tmp_path / 'one'}"], capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          f"--out_dir={tmp_path / 'two'}"], capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    logged = lambda out: {r["step"]: r["train_loss"] for r in map(json.loads, open(out / "log.jsonl")) if "train_loss" in r}
    a, b = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert all(abs(a[s] - b[s]) < 1e-3 for s in a)


@pytest.mark.parametrize("lora_args", [[], ["--lora_r=4", "--lora_targets=q,v"]], ids=["full", "lora"])
def test_dpo_runs_compiled_on_the_gpu(tmp_path, lora_args, gpt2_bpe):
    """DPO's paths on the GPU: the compiled answer log-probabilities, the reference (adapters off
    under the compiled graph, or stored), the fused log-softmax; step 0's policy is its reference."""
    import math

    from conftest import random_gpt_folder
    from test_dpo import write_sums

    write_sums(tmp_path / "sums")
    base = random_gpt_folder(tmp_path / "base", n_embd=64, block_size=64)
    config = train.load_train_config(["--objective=dpo", f"--dataset={tmp_path / 'sums'}", f"--init_from={base}",
                                      f"--out_dir={tmp_path / 'out'}", "--block_size=16", "--batch_size=8",
                                      "--device=cuda", "--dtype=auto", "--compile=true", "--max_iters=30",
                                      "--eval_interval=30", "--log_interval=1", "--plot=false", "--warmup_iters=2",
                                      "--learning_rate=3e-3", "--beta=0.5", *lora_args])
    train.check_config(config)
    train.train(config)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    val = {r["step"]: r for r in rows if "val_loss" in r}
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-3)  # the start is its own reference
    assert val[30]["val_loss"] < val[0]["val_loss"] and val[30]["val_reward_accuracy"] > 0.5


# ----------------------------------------------------------------------------- past one GPU's memory (test_fsdp.py)

def test_fsdp_with_one_rank_trains_saves_and_resumes_on_the_gpu(tmp_path, synthetic_dataset):
    import checkpoint

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    args = [str(ROOT / "train.py"), "--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64",
            "--block_size=128", "--batch_size=4", "--gradient_accumulation_steps=2", f"--dataset={synthetic_dataset}",
            "--device=cuda", "--dtype=auto", "--eval_interval=4", "--log_interval=1", "--plot=false", "--learning_rate=3e-3",
            "--lr_decay_iters=8", "--fsdp=true", f"--out_dir={tmp_path / 'out'}"]
    first = subprocess.run([*torchrun, *args, "--max_iters=4"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "out" / checkpoint.LATEST / checkpoint.SHARDS / ".metadata").is_file()
    second = subprocess.run([*torchrun, *args, "--max_iters=8", "--init_from=resume",
                             "--activation_checkpointing=true"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    checkpoint.load_model(tmp_path / "out")  # best/: a plain folder


def peak_of_steps(model, rows, block_size, steps=2, optimizer=True):
    """Peak bytes allocated while taking AdamW steps (or only forward and backward) on random masked rows,
    above what was allocated before the model was built (the caller passes that as model.base)."""
    from optim import make_optimizer

    trained = [p for p in model.parameters() if p.requires_grad]
    adamw = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), "cuda") if optimizer else None
    x, y = masked_batch(rows, block_size)
    supervised = (y.flatten() >= 0).nonzero().squeeze(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=HALF):
            _, loss = model(x, y, reduction="sum", supervised=supervised)
        loss.backward()
        if adamw is not None:
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            adamw.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - model.base


def fresh_gpt(config, lora_config=None):
    """A random GPT built on the GPU (fast even for gpt2-xl), LoRA'd as train.py does it; .base: the bytes
    allocated before it."""
    import gc

    import lora

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        model = GPT(config)
        if lora_config is not None:
            lora.apply_lora(model, lora_config)
            lora.cast_frozen_linears(model, HALF)
    model.base = base
    return model


def test_activation_checkpointing_lowers_the_peak_by_what_the_plan_says():
    import memory

    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # gpt2's shape, 8 rows of 1024
    peaks = {}
    for checkpointing in (False, True):
        model = fresh_gpt(config)
        model.activation_checkpointing = checkpointing
        peaks[checkpointing] = peak_of_steps(model, 8, 1024, steps=1, optimizer=False)
        del model
    planned = [memory.step_memory(config, None, 8, 1024, AUTO, 1, "ddp", checkpointing=c).activations
               for c in (False, True)]
    measured_drop, planned_drop = peaks[False] - peaks[True], planned[0] - planned[1]
    print(f"activation checkpointing: peak {peaks[False] / 2 ** 30:.2f} -> {peaks[True] / 2 ** 30:.2f} GiB, "
          f"planned activations {planned[0] / 2 ** 30:.2f} -> {planned[1] / 2 ** 30:.2f} GiB")
    assert peaks[True] < 0.6 * peaks[False]
    assert abs(measured_drop - planned_drop) < 0.2 * planned_drop, (measured_drop, planned_drop)


@pytest.mark.parametrize("case", ["gpt2-xl LoRA (emerald-003)", "gpt2-xl full", "gpt2-xl full, checkpointed",
                                  "gpt2-medium full"])
def test_the_memory_plan_against_the_measured_peak(case):
    """A training step (two, so AdamW's state exists) at 4 x 1024 tokens, one GPU, dtype=auto."""
    import lora
    import memory

    shape = GPTConfig.preset(case.split()[0])
    lora_config = lora.LoRAConfig(r=16, alpha=32.0, dropout=0.05, targets=("q", "v")) if "LoRA" in case else None
    checkpointing = "checkpointed" in case
    plan = memory.step_memory(shape, lora_config, 4, 1024, AUTO, 1, "ddp", checkpointing=checkpointing,
                              dropout=0.0)
    if plan.total + memory.GPU_RESERVED > torch.cuda.get_device_properties(0).total_memory:
        pytest.skip(f"the plan says {plan.total / 2 ** 30:.1f} GiB: more than this GPU has")
    model = fresh_gpt(shape, lora_config)
    model.activation_checkpointing = checkpointing
    peak = peak_of_steps(model, 4, 1024)
    print(f"{case}: planned {plan.total / 2 ** 30:.2f} GiB (weights {plan.weights / 2 ** 30:.2f}, gradients "
          f"{plan.gradients / 2 ** 30:.2f}, optimizer {plan.optimizer / 2 ** 30:.2f}, activations "
          f"{plan.activations / 2 ** 30:.2f}), measured peak {peak / 2 ** 30:.2f} GiB")
    assert abs(peak - plan.total) < 0.15 * plan.total, (case, peak, plan)


@pytest.fixture
def float32_matmuls():
    """float32 references computed in float32, not TF32, whatever set-up ran before."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_output_layer_gradient_products_write_float32_on_the_gpu(dtype, float32_matmuls):
    """loss.py's gradient products on CUDA: 16-bit inputs, float32 accumulation and output in one
    cuBLAS call (torch >= 2.8), gradients close to float32's over GPT-2's padded vocabulary."""
    import torch.nn.functional as F

    import loss

    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs sm80 or newer")
    if not loss.MM_WRITES_FLOAT32:
        pytest.skip("torch < 2.8: no float32-output 16-bit products")
    torch.manual_seed(0)
    h = (torch.randn(3000, 256, device="cuda") * 3).to(dtype).float().requires_grad_()  # values the dtype holds
    weight = torch.randn(50304, 256, device="cuda") * 0.05
    weight[50257:] = 0  # the embedding's padding rows
    weight = weight.to(dtype).float().requires_grad_()
    targets = torch.randint(0, 50257, (3000,), device="cuda")

    layer = loss._OutputLayer(h, weight, 50257, dtype)
    a, b = h.detach()[:512].to(dtype), weight.detach()[:4096].t().to(dtype)
    product = layer.product(a, b)
    assert layer.writes_float32 == loss.MM_WRITES_FLOAT32 and product.dtype == torch.float32
    exact = a.float() @ b.float()
    assert ((product - exact).norm() / exact.norm()).item() < 5e-5  # a 16-bit output would be ~1e-4 off

    F.cross_entropy(F.linear(h, weight)[:, :50257], targets, reduction="sum").backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cuda", dtype=dtype):
        value = loss.linear_cross_entropy(h, weight, targets, 50257)
    value.backward()
    relative_error = lambda x, y: ((x - y).norm() / y.norm()).item()
    assert h.grad.dtype == weight.grad.dtype == torch.float32
    assert torch.isfinite(h.grad).all() and torch.isfinite(weight.grad).all() and (weight.grad[50257:] == 0).all()
    tolerance = 1e-3 if dtype == torch.float16 else 1e-2  # float16 holds 3 more bits
    assert relative_error(h.grad, expected_h) < tolerance and relative_error(weight.grad, expected_w) < tolerance


def test_fused_output_layer_fp16_weight_gradient_stays_finite_on_the_gpu(float32_matmuls):
    """Summed over many rows of large hidden states, d loss / d weight leaves float16's range: the
    float32-written products keep it finite (a float16 output would be inf)."""
    import torch.nn.functional as F

    import loss

    torch.manual_seed(0)
    h = (torch.rand(4096, 64, device="cuda") * 100 + 150).half().float().requires_grad_()
    weight = (torch.randn(128, 64, device="cuda") * 0.01).half().float().requires_grad_()
    targets = torch.randint(0, 4, (4096,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss.linear_cross_entropy(h, weight, targets, 100).backward()
    expected = torch.autograd.grad(F.cross_entropy(F.linear(h, weight)[:, :100], targets, reduction="sum"), weight)[0]
    assert expected.abs().max() > 65504 and torch.isfinite(weight.grad).all()
    assert ((weight.grad - expected).norm() / expected.norm()).item() < 1e-3


def test_serve_batcher_replays_cuda_graphs_through_its_cache_views():
    """serve --compile: the batcher decodes through views of its cache (the busy rows, padded to a
    power of two). Marked static like the cache itself, they let every step replay a CUDA graph
    (torch skips graphs for inputs a step writes that are not static); every size is compiled and
    recorded by warm_up(), before the first job."""
    import tokenizer
    from torch._dynamo.utils import counters

    try:
        tokenizer.get_encoding()  # a job's text is decoded as it goes
    except Exception as err:
        pytest.skip(f"needs the GPT-2 BPE files (TIKTOKEN_CACHE_DIR): {err}")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt().eval()
    greedy = engine.Sampling(temperature=0)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (7, 3, 20)]
    batcher = engine.Batcher(engine.Engine(model, compile=True), max_batch=4)
    assert batcher.sizes == [1, 2, 4]
    batcher.warm_up()
    jobs = [engine.Job(p, n, greedy, lambda text, finish: None, raw=True) for p, n in zip(prompts, (24, 8, 16))]
    with torch._dynamo.config.patch(error_on_recompile=True):  # monkeypatch's undo would hide the setting
        for step in range(40):
            batcher.step(jobs[:2] if step == 0 else jobs[2:] if step == 3 else ())
    assert batcher.busy == 0 and batcher.peak_busy == 3
    assert counters["inductor"]["cudagraph_skips"] == 0
    for prompt, job in zip(prompts, jobs):
        alone = [tokens[0] for tokens in engine.Engine(model).generate([prompt], job.max_new_tokens, greedy)]
        generated = job.history[len(prompt):]  # all of them, unless end-of-text came first
        assert generated == alone[:len(generated)]
        assert len(generated) == job.max_new_tokens or generated[-1] == tokenizer.EOT
