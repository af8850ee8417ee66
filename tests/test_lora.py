"""The hand-written LoRA: identity at init, merge/unmerge, adapter files, what trains."""

import os

import pytest
import torch

from common import GrafitoError
from lora import (ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, apply_lora, cast_frozen_linears, fold_lora, load_adapter, lora_layers,
                  merge_lora, save_adapter, unmerge_lora)
from model import GPT, GPTConfig

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG)


def train_a_little(model, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (4, 32))
    for _ in range(steps):
        _, loss = model(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_fresh_adapter_changes_nothing():
    base = tiny_gpt().eval()
    idx = torch.randint(0, 64, (2, 32))
    expected = base(idx)[0]
    adapted = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"))).eval()
    assert torch.equal(adapted(idx)[0], expected)


def test_q_and_v_get_separate_adapters_and_k_none():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("q", "v")))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LoRALinear)
    assert c_attn.lora_A.shape == (2, 4, 32) and c_attn.lora_B.shape == (2, 32, 4)
    with torch.no_grad():
        c_attn.lora_B.normal_()
    rows = c_attn.delta_weight().abs().sum(dim=1)  # which output rows (q | k | v) change
    assert (rows[:32] > 0).all() and (rows[32:64] == 0).all() and (rows[64:] > 0).all()
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)


def test_only_lora_parameters_train_and_base_is_untouched():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, alpha=8, dropout=0.1))
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    train_a_little(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        assert param.grad is None, name
        assert torch.equal(param, before[name]), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives LoRA


def test_merge_equals_unmerged_and_unmerge_restores_base():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("q", "v", "mlp_fc")))
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    train_a_little(model)
    model.eval()
    idx = torch.randint(0, 64, (2, 32))
    unmerged = model(idx)[0]
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model))
    assert (model(idx)[0] - unmerged).abs().max().item() < 1e-5
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base_weights["transformer.h.0.attn.c_attn.weight"])
    unmerge_lora(model)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert (param - base_weights[name]).abs().max().item() < 1e-6, name


@pytest.mark.parametrize("frozen_dtype", [torch.float32, torch.bfloat16])  # bf16: as train.py keeps a LoRA base
def test_folded_adapters_leave_a_plain_trainable_gpt_that_takes_a_new_adapter(frozen_dtype):
    model = train_a_little(apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("q", "v", "mlp_proj")))).eval()
    idx = torch.randint(0, 64, (2, 32))
    cast_frozen_linears(model, frozen_dtype)
    c_attn = model.transformer.h[0].attn.c_attn
    expected_weight = c_attn.weight.float() + c_attn.delta_weight()  # the merge, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=frozen_dtype != torch.float32):
        unmerged = model(idx)[0].float()
    fold_lora(model)
    assert not lora_layers(model) and all("lora_" not in n for n, _ in model.named_parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(model.transformer.h[0].attn.c_attn.weight, expected_weight, atol=1e-6)
    if frozen_dtype != torch.float32:
        return
    assert (model(idx)[0] - unmerged).abs().max().item() < 1e-5
    apply_lora(model, LoRAConfig(r=2))  # a second adapter on the folded weights starts as the identity
    assert (model(idx)[0] - unmerged).abs().max().item() < 1e-5


def test_adapters_stay_float32_under_bf16_base():
    model = tiny_gpt().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(r=4))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.lora_A.grad.dtype == torch.float32


def test_adapter_round_trip_is_small_and_exact(tmp_path):
    model = train_a_little(apply_lora(tiny_gpt(), LoRAConfig(r=4, alpha=8))).eval()
    save_adapter(model, tmp_path / "adapter", base_model="tiny", base_config={"n_layer": 2})
    size = os.path.getsize(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert size < 4 * n_lora + 4096  # the factors only, not the model
    restored = load_adapter(tiny_gpt(), tmp_path / "adapter").eval()
    idx = torch.randint(0, 64, (2, 32))
    assert torch.equal(restored(idx)[0], model(idx)[0])
    assert restored.lora_config == model.lora_config


def test_broken_or_mismatched_adapters_are_clear_errors(tmp_path):
    import json
    from dataclasses import asdict

    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "a", base_model="tiny", base_config=asdict(model.config))
    other_base = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64))  # same shapes
    with pytest.raises(GrafitoError, match="different base .*n_head 2 vs 4"):
        load_adapter(other_base, tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes(b"truncated")
    with pytest.raises(GrafitoError, match="cannot read LoRA adapter weights"):
        load_adapter(tiny_gpt(), tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(GrafitoError, match="cannot read LoRA adapter weights"):
        load_adapter(tiny_gpt(), tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "r"}))
    with pytest.raises(GrafitoError, match="lacks r"):
        load_adapter(tiny_gpt(), tmp_path / "a")


def test_exporting_full_weights_with_unmerged_adapters_is_refused(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    with pytest.raises(GrafitoError, match="unmerged LoRA"):
        model.save_pretrained(tmp_path / "x")
    merge_lora(model)
    model.save_pretrained(tmp_path / "x")  # merged: a plain GPT-2 folder
    assert (tmp_path / "x" / "model.safetensors").exists()


def test_bad_lora_settings_are_clear_errors():
    with pytest.raises(GrafitoError, match="choose from"):
        LoRAConfig(targets=("query",))
    with pytest.raises(GrafitoError, match="positive integer"):
        LoRAConfig(r=0)
