"""Past one GPU's memory: FSDP (--fsdp, torch's fully_shard over gloo on CPU processes) trains like one
process, resumes exactly from a run killed while saving, tunes with LoRA and DPO; activation
checkpointing gives the plain gradients; the memory plan (memory.py, --plan) against a hand computation."""

import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import lora
import memory
import train
from common import GrafitoError
from conftest import ROOT, random_gpt_folder
from model import GPT, GPTConfig
from test_dpo import TINY as DPO_TINY
from test_dpo import write_sums
from test_train import TINY, logged

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# the scheduled run: 4 steps of 2 micro-batches of 2 rows, evaluated and saved every 2 steps
STEPS = [f"--{k}={v}" for k, v in dict(batch_size=2, gradient_accumulation_steps=2, eval_interval=2, lr_decay_iters=4,
                                       learning_rate=1e-3).items()]


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def train_here(*args):
    """One process, in this one (a subprocess would cost seconds of start-up): the runs FSDP is held to."""
    config = train.load_train_config(list(map(str, args)))
    train.check_config(config)
    train.train(config)


def succeeded(result):
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def same_logs(a, b, keys=("train_loss", "val_loss"), tolerance=1e-5):
    for key in keys:
        x, y = logged(a, key), logged(b, key)
        assert sorted(x) == sorted(y) and len(x) >= 3, (key, x, y)
        assert all(abs(x[s] - y[s]) < tolerance for s in x), (key, x, y)


def same_weights(a, b, tolerance=1e-5):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=tolerance), name


# ----------------------------------------------------------------------------- FSDP runs (two CPU processes, gloo)

@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_dataset):
    """One process and two FSDP processes, 4 uninterrupted steps each (float32, no dropout)."""
    out = tmp_path_factory.mktemp("straight")
    args = [*TINY, f"--dataset={tiny_dataset}", "--max_iters=4", *STEPS]
    train_here(*args, f"--out_dir={out / 'one'}")
    succeeded(run_script(*TORCHRUN, ROOT / "train.py", *args, "--fsdp=true", f"--out_dir={out / 'fsdp'}"))
    return out


def test_two_fsdp_processes_train_like_one_and_save_a_plain_best(straight):
    same_logs(straight / "one", straight / "fsdp")
    ckpt = straight / "fsdp" / checkpoint.LATEST
    assert (ckpt / checkpoint.SHARDS / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert "optimizer" not in torch.load(ckpt / checkpoint.TRAIN_STATE, weights_only=True)  # it is in the shards
    # best/ is a plain folder that one process loads (rank 0 gathered it), equal to the one-process run's
    same_weights(checkpoint.load_model(straight / "fsdp"), checkpoint.load_model(straight / "one"))
    with pytest.raises(GrafitoError, match="sharded checkpoint of an FSDP run.*best/"):
        checkpoint.load_model(ckpt)


def test_an_fsdp_run_killed_while_saving_resumes_exactly_from_its_last_whole_checkpoint(tmp_path, straight,
                                                                                          tiny_dataset):
    """Rank 0 dies after every rank wrote step 4's shards and it wrote train_state.pt, before the rename;
    step 2's ckpt/ is whole, and resuming from it (with activation checkpointing, which changes no
    number) gives the uninterrupted run's losses."""
    out = tmp_path / "out"
    killer = tmp_path / "killed_in_save.py"
    killer.write_text(
        f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport torch, train\nsave = torch.save\n"
        "def save_then_die(obj, f, *args, **kwargs):\n"
        "    save(obj, f, *args, **kwargs)\n"
        "    if str(f).endswith('train_state.pt') and obj['step'] == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save_then_die\ntrain.main()\n")
    args = [*TINY, f"--dataset={tiny_dataset}", *STEPS, "--fsdp=true", "--activation_checkpointing=true",
            f"--out_dir={out}"]
    killed = run_script(*TORCHRUN, killer, *args, "--max_iters=4")
    assert killed.returncode != 0
    assert torch.load(out / checkpoint.LATEST / checkpoint.TRAIN_STATE, weights_only=True)["step"] == 2
    assert list(out.glob(".ckpt.tmp-*"))  # the finished but unrenamed step-4 save
    succeeded(run_script(*TORCHRUN, ROOT / "train.py", *args, "--max_iters=4", "--init_from=resume"))
    assert not list(out.glob(".ckpt.tmp-*"))
    same_logs(straight / "fsdp", out, tolerance=1e-6)


@pytest.mark.parametrize("kind", ["lora", "full_stored"])
def test_dpo_under_fsdp_equals_one_process(tmp_path, kind):
    """LoRA: adapters trained beside the sharded frozen base, the reference is the sharded model with its
    adapters off. Full: the starting model's log-probabilities, computed by every rank, stored by rank 0, on
    a mixture of two datasets (the stored reference holds a tensor for each)."""
    write_sums(tmp_path / "sums")
    dataset = str(tmp_path / "sums")
    if kind == "full_stored":
        write_sums(tmp_path / "more_sums", seed=1)
        dataset += f",{tmp_path / 'more_sums'}"
    base = random_gpt_folder(tmp_path / "base", n_embd=32, block_size=64)
    extra = ["--lora_r=4", "--lora_targets=q,v,mlp_fc", "--lora_dropout=0", "--learning_rate=2e-2"] if kind == "lora" else []
    args = [*DPO_TINY, f"--dataset={dataset}", f"--init_from={base}", "--max_iters=4", "--eval_interval=2",
            "--gradient_accumulation_steps=2", *extra]
    train_here(*args, f"--out_dir={tmp_path / 'one'}")
    succeeded(run_script(*TORCHRUN, ROOT / "train.py", *args, "--fsdp=true", f"--out_dir={tmp_path / 'fsdp'}"))
    same_logs(tmp_path / "one", tmp_path / "fsdp", keys=("train_loss", "train_reward_margin", "val_loss"))
    assert logged(tmp_path / "one", "train_loss")[4] != logged(tmp_path / "one", "train_loss")[1]
    best = tmp_path / "fsdp" / checkpoint.BEST
    assert (best / (lora.ADAPTER_WEIGHTS if kind == "lora" else "model.safetensors")).is_file()
    same_weights(checkpoint.load_model(tmp_path / "fsdp"), checkpoint.load_model(tmp_path / "one"))


def test_fsdp_needs_torchrun(tmp_path, tiny_dataset):
    config = train.load_train_config(TINY + [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--fsdp=true"])
    with pytest.raises(GrafitoError, match="--fsdp shards the model over torchrun's processes"):
        train.train(config)


def test_a_resume_keeps_the_checkpoint_format():
    config = train.load_train_config(["--fsdp=true"])
    state = {"config": {**config, "fsdp": False}, "accumulation": 1, "world": 1}
    with pytest.raises(GrafitoError, match=r"cannot resume with different fsdp \(False -> True\)"):
        checkpoint.check_resume(state, config, "float32", 1, 1)


# ----------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("adapters", [False, True])
def test_activation_checkpointing_recomputes_each_block_and_gives_the_plain_gradients(adapters):
    """Dropout on: the recomputation must draw the masks the forward drew."""
    def gradients(checkpointing):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=97, dropout=0.2))
        if adapters:
            lora.apply_lora(model, lora.LoRAConfig(r=2, targets=("q", "v", "mlp_fc"), dropout=0.2))
            for layer in lora.lora_layers(model):  # B starts at zero: give the adapters a gradient path everywhere
                torch.nn.init.normal_(layer.lora_B, std=0.1)
        model.activation_checkpointing = checkpointing
        calls = []
        model.transformer.h[1].register_forward_pre_hook(lambda *_: calls.append(1))
        x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
        _, loss = model(x, y)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain_loss, plain, plain_calls = gradients(False)
    loss, checkpointed, calls = gradients(True)
    assert (plain_calls, calls) == (1, 2)  # the block ran again in the backward
    assert loss == plain_loss and plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5), name


# ----------------------------------------------------------------------------- the memory plan

XL = dict(L=48, C=1600, V=50304, T=1024)  # gpt2-xl, its vocabulary padded to a multiple of 64


def xl_parameters():
    L, C, V, T = XL["L"], XL["C"], XL["V"], XL["T"]
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)  # LNs, attn, MLP
    root = V * C + T * C + 2 * C  # token and position embeddings, final LayerNorm
    return block, root, L * block + root


def test_the_plan_for_gpt2_xl_against_a_hand_computation():
    block, root, P = xl_parameters()
    assert P == 1_557_686_400  # GPT-2 XL's 1,557.6M, plus the 47 padding rows of the embedding
    L, C, V = XL["L"], XL["C"], XL["V"]
    shape = GPTConfig.preset("gpt2-xl")
    tokens = 4 * 1024
    # full fine-tuning in bf16 on 8 GPUs, FSDP, one micro-batch per GPU and step
    fsdp = memory.step_memory(shape, None, 4, 1024, "bfloat16", 8, "fsdp")
    assert fsdp.weights == 4 * P / 8 + 2 * (root + 2 * block)  # float32 shards + the root and two blocks in bf16
    assert fsdp.gradients == 4 * P / 8 + (2 + 4) * (root + 2 * block)  # + their bf16 grads, float32 reduce buffers
    assert fsdp.optimizer == 8 * P / 8
    per_block = (4 + 2 * 3 + 2 + 4 + 2 * 4) * C + (2 * 2 + 2 * 4) * C  # 36 bytes a channel: memory.py's list
    head = 8 * C * tokens + 1024 * V * (2 + 4 + 2) + 4 * V * C  # LN input + hidden grads, logits chunk, weight grad
    assert fsdp.activations == (L + 1) * per_block * tokens + head
    assert fsdp.total == fsdp.weights + fsdp.optimizer + fsdp.activations  # the gradients come as activations go
    # the same run on one GPU as one process: 16 bytes a parameter; autocast's bf16 copies of the matrices and of
    # the output layer's weight live like activations
    one = memory.step_memory(shape, None, 4, 1024, "bfloat16", 1, "ddp")
    assert (one.weights, one.gradients, one.optimizer) == (4 * P, 4 * P, 8 * P)
    assert one.activations == fsdp.activations + 2 * V * C + 2 * L * (12 * C * C)
    assert one.total == 12 * P + one.activations
    # checkpointing keeps each block's float32 input, and recomputes one block at a time
    checkpointed = memory.step_memory(shape, None, 4, 1024, "bfloat16", 8, "fsdp", checkpointing=True)
    assert checkpointed.activations == (L * 4 * C + 2 * per_block) * tokens + head
    # several micro-batches per GPU without a reduce each: whole float32 gradients kept between them, and held
    # through the next micro-batch's activations
    accumulating = memory.step_memory(shape, None, 4, 1024, "bfloat16", 8, "fsdp", micro_batches=2)
    assert accumulating.gradients == fsdp.gradients + 4 * P
    assert accumulating.total == fsdp.total + 4 * P
    # DDP over 8 GPUs: its gradient buckets, a second float32 copy held all along
    ddp = memory.step_memory(shape, None, 4, 1024, "bfloat16", 8, "ddp")
    assert ddp.gradients == 8 * P and ddp.total == 16 * P + one.activations
    # emerald-003's LoRA (r=16 on q and v) on one GPU: frozen block linears in bf16, adapters trained
    adapters = L * 2 * 16 * (C + C)
    emerald = memory.step_memory(shape, lora.LoRAConfig(r=16, alpha=32, dropout=0.05, targets=("q", "v")), 4, 1024,
                                 "bfloat16", 1, "ddp")
    frozen_linears = L * (block - 4 * C)  # all but the LayerNorms
    assert emerald.weights == 2 * frozen_linears + 4 * (P - frozen_linears + adapters)
    assert (emerald.gradients, emerald.optimizer) == (4 * adapters, 8 * adapters)
    # no frozen matmul inputs; the adapter's float32 input and dropout mask, its bf16 updates of q and v
    lora_block = (4 + 2 * 3 + 2 + 4 + 2 * 4) * C + (4 + 1) * C + 2 * 2 * C
    assert emerald.activations == (L + 1) * lora_block * tokens + 8 * C * tokens + 1024 * V * 8 + 2 * V * C
    assert memory.fits(emerald.total) == [16, 24, 40, 80] and memory.fits(one.total) == [40, 80]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("targets", [None, ("q", "v"), ("k", "attn_proj", "mlp_fc", "mlp_proj")])
def test_the_planned_activations_of_a_block_are_what_autograd_keeps(dtype, targets):
    """Every tensor a block saves for its backward, counted by storage (a tensor and its views once); the
    weights (and autocast's copies of them) left out: 3 x 50 tokens divide no weight's size. The plan
    leaves out what does not grow with the width: LayerNorm and attention statistics, LoRA's rank-wide
    intermediates."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=50, vocab_size=97)
    model = GPT(config)
    adapters = None
    if targets:
        adapters = lora.LoRAConfig(r=4, targets=targets, dropout=0.0)
        lora.apply_lora(model, adapters)
        if dtype != "float32":
            lora.cast_frozen_linears(model, torch.bfloat16)
    tokens, saved = 3 * 50, {}

    def keep(tensor):
        if tensor.numel() % tokens == 0:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(3, 50, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "float32"):
            model.transformer.h[0](x)
    small = 4 * (2 * 2 + 2) + 4 * (2 * 4 * 4)  # per token: LayerNorm means and deviations, SDPA's log-sum-exp, LoRA's
    planned = memory.block_activations(config, adapters, dtype, dropout=0.0)
    assert planned <= sum(saved.values()) / tokens <= planned + small, (sum(saved.values()) / tokens, planned)


@pytest.mark.parametrize("config_file,preset", [("diamond_001", "gpt2-large"), ("emerald_003", "gpt2-xl")])
def test_the_lora_configs_fit_a_24_gb_gpu_and_full_fine_tuning_of_gpt2_xl_does_not(config_file, preset):
    from configurator import read_config_file

    config = train.load_train_config([str(ROOT / "config" / f"{config_file}.py")])
    assert read_config_file(ROOT / "config" / f"{config_file}.py")["lora_r"] > 0
    shape = GPTConfig.preset(preset)
    needed = memory.for_run(config, shape, train.lora_settings(config), 1, 1, 1, "bfloat16").total
    assert 24 in memory.fits(needed)
    if preset == "gpt2-xl":  # 16 bytes a parameter at the end of the backward, even for one token
        assert 24 not in memory.fits(memory.step_memory(shape, None, 1, 1, "bfloat16", 1, "ddp").total)


def test_the_activations_grow_linearly_with_the_context():
    """SDPA's kernels never store the (heads x T x T) attention scores: no quadratic term."""
    shape = GPTConfig.preset("gpt2")
    at = [memory.step_memory(shape, None, 4, block, "bfloat16", 1, "ddp").activations for block in (2048, 4096, 6144)]
    assert at[2] - at[1] == at[1] - at[0] > 0  # past the 1024-row logits chunk


def test_plan_prints_every_strategy_without_loading_weights(tmp_path, capsys):
    """init_from=gpt2-xl offline, with no weights anywhere: the shape is GPT-2's preset."""
    train.main([str(ROOT / "config" / "emerald_003.py"), "--plan", "--plan_world=4", "--lora_r=0", "--fsdp=true",
                "--activation_checkpointing=true", f"--out_dir={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    assert "1,557.7M parameters (all trained), bfloat16, 4 rows x 1024 tokens" in lines[0] and "4 GPU(s)" in lines[0]
    rows = {line[:24].strip(): line for line in lines[2:6]}
    assert set(rows) == {"ddp", "ddp + checkpointing", "fsdp", "fsdp + checkpointing"}
    assert rows["fsdp + checkpointing"].endswith("<- this run")
    expected = memory.step_memory(GPTConfig.preset("gpt2-xl"), None, 4, 1024, "bfloat16", 4, "fsdp", checkpointing=True)
    assert f"{expected.total / 2 ** 30:.2f}" in rows["fsdp + checkpointing"]
    assert not list(tmp_path.iterdir())  # nothing written
