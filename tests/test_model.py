"""GPT-2 numerics against transformers, the KV cache, sampling and the weight loader."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import GrafitoError
from model import GPT, GPTConfig, KVCache, left_pad, sample_next


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def original_layout(folder, out, n_layer, n_positions, as_bin=False):
    """Rewrite a save_pretrained folder in the layout of OpenAI's hub files: no 'transformer.'
    prefix, plus the attn.bias / attn.masked_bias buffers."""
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if as_bin:
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, out / "model.safetensors")
    return out


SHAPES = [  # n_layer, n_head, n_embd, n_positions, vocab, block_size override
    (2, 2, 32, 64, 97, None),
    (3, 4, 64, 48, 130, 32),  # block_size below n_positions: wpe cropped
    (1, 1, 48, 16, 64, None),
]


@pytest.mark.parametrize("n_layer,n_head,n_embd,n_positions,vocab,block", SHAPES)
@pytest.mark.parametrize("layout", ["save_pretrained", "original", "original_bin"])
def test_logits_match_transformers(hf_checkpoint, tmp_path, layout, n_layer, n_head, n_embd, n_positions, vocab, block):
    folder, hf = hf_checkpoint(n_layer, n_head, n_embd, n_positions, vocab)
    if layout != "save_pretrained":
        folder = original_layout(folder, tmp_path / layout, n_layer, n_positions, as_bin=layout == "original_bin")
    overrides = {"block_size": block} if block else {}
    model = GPT.from_pretrained(folder, **overrides).eval()
    T = block or n_positions
    idx = torch.randint(0, vocab, (3, T))
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (3, T, vocab)
    assert (logits - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_presets_have_openai_sizes():
    sizes = {name: GPT(GPTConfig.preset(name, n_layer=1)).config for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]}
    assert [(c.n_head, c.n_embd) for c in sizes.values()] == [(12, 768), (16, 1024), (20, 1280), (25, 1600)]
    full = GPT(GPTConfig.preset("gpt2"))
    assert full.num_params() == 124_439_808 - 1024 * 768 + 47 * 768  # HF count minus wpe, plus padded rows


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=90)).eval()
    model.save_pretrained(tmp_path / "ours")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 90, (2, 24))
    assert (model(idx)[0] - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    again = GPT.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(again(idx)[0], model(idx)[0])


def test_model_without_biases_exports_as_zero_biases(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=False)).eval()
    model.save_pretrained(tmp_path / "nobias")
    idx = torch.randint(0, 50, (1, 16))
    assert torch.allclose(GPT.from_pretrained(tmp_path / "nobias").eval()(idx)[0], model(idx)[0], atol=1e-6)
    reloaded = GPT.from_pretrained(tmp_path / "nobias", bias=False).eval()  # as resume rebuilds it
    assert [n for n, _ in reloaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert torch.allclose(reloaded(idx)[0], model(idx)[0], atol=1e-6)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)).save_pretrained(tmp_path / "b")
    state = load_file(tmp_path / "b" / "model.safetensors")
    state["transformer.h.0.ln_1.bias"] = torch.ones(32)
    save_file(state, tmp_path / "b" / "model.safetensors")
    with pytest.raises(GrafitoError, match="biases such as .* are not zero"):
        GPT.from_pretrained(tmp_path / "b", bias=False)


def test_masked_loss_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=70)).eval()
    idx = torch.randint(0, 70, (4, 32))
    targets = torch.randint(0, 70, (4, 32))
    targets[torch.rand(4, 32) < 0.6] = -1
    no_logits, loss = model(idx, targets)
    full_logits, _ = model(idx)
    expected = F.cross_entropy(full_logits.view(-1, 70), targets.view(-1), ignore_index=-1)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert no_logits is None
    _, loss_sum = model(idx, targets, loss_reduction="sum")
    assert torch.allclose(loss_sum, expected * (targets >= 0).sum(), rtol=1e-5)
    _, no_loss = model(idx, torch.full_like(targets, -1))
    assert no_loss.item() == 0.0


def test_batch_without_supervised_tokens_gives_zero_gradients():
    """A packed row can hold only prompt tokens; its gradient must be zero, not garbage."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=70))
    torch.empty(1 << 20).fill_(float("nan"))  # leave NaNs in freed memory an uninitialised buffer could reuse
    _, loss = model(torch.randint(0, 70, (2, 16)), torch.full((2, 16), -1))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or (param.grad == 0).all(), name


def test_model_gradients_equal_full_logits_cross_entropy():
    """The fused output layer and the shared tied-weight gradient change nothing but speed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=70))
    idx, targets = torch.randint(0, 70, (3, 16)), torch.randint(0, 70, (3, 16))
    targets[torch.rand(3, 16) < 0.5] = -1
    logits, _ = model(idx)
    F.cross_entropy(logits.reshape(-1, 70), targets.reshape(-1), ignore_index=-1).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(idx, targets)[1].backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6), name


def test_compiled_model_gradients_equal_eager():
    """torch.compile (compile=True in the codename configs) must keep the tied weight's
    output-layer gradient, not only the embedding's part of it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=70))
    idx, targets = torch.randint(0, 70, (2, 16)), torch.randint(0, 70, (2, 16))
    targets[:, :6] = -1
    grads = []
    for run in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        run(idx, targets)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5), name


def test_fused_output_loss_gradients_equal_the_reference():
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(128, 32, requires_grad=True)  # 100 real rows + padding, as the tied embedding
    targets = torch.randint(0, 100, (300,))
    reference = F.cross_entropy(F.linear(h, weight)[:, :100], targets, reduction="sum")
    reference.backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    from model import linear_cross_entropy

    fused = linear_cross_entropy(h, weight, targets, 100, chunk_rows=64)  # several chunks
    (fused * 0.5).backward()
    assert torch.allclose(fused, reference, rtol=1e-5)
    assert torch.allclose(h.grad, expected_h * 0.5, atol=1e-5) and torch.allclose(weight.grad, expected_w * 0.5, atol=1e-5)
    assert (weight.grad[100:] == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 softmax: as autocast's own path
        fused_bf16 = linear_cross_entropy(h, weight, targets, 100)
        reference_bf16 = F.cross_entropy(F.linear(h, weight)[:, :100].float(), targets, reduction="sum")
    assert torch.allclose(fused_bf16, reference_bf16, rtol=1e-4)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=40, vocab_size=80)).eval()
    idx = torch.randint(0, 80, (2, 40))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 40, "cpu", torch.float32)
    with torch.no_grad():
        steps = [model.lm_head(model.hidden_states(idx[:, :7], cache))[..., :80]]  # prefill
        steps += [model.lm_head(model.hidden_states(idx[:, t:t + 1], cache))[..., :80] for t in range(7, 20)]
        steps += [model.decode_step(idx[:, t], cache)[:, None] for t in range(20, 30)]  # fixed-shape steps
        steps += [model.lm_head(model.hidden_states(idx[:, 30:], cache))[..., :80]]  # a chunk after them
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_left_padded_batch_matches_each_prompt_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=60)).eval()
    prompts = [torch.randint(0, 60, (n,)) for n in (5, 11, 8)]
    idx, mask = left_pad(prompts, pad_id=0)
    batched = model.generate(idx, 12, temperature=0, prompt_mask=mask)[:, idx.shape[1]:]
    for row, prompt in zip(batched, prompts):
        alone = model.generate(prompt[None], 12, temperature=0)[0, len(prompt):]
        assert torch.equal(row, alone)


def test_greedy_generation_equals_transformers_and_uncached_greedy(hf_checkpoint):
    folder, hf = hf_checkpoint(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=113)
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 113, (2, 9))
    ours = model.generate(idx, 40, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    uncached = idx
    for _ in range(40):  # no cache: the whole sequence every step
        uncached = torch.cat([uncached, model(uncached)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, uncached)


def test_generation_past_the_context_window_keeps_going():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=40)).eval()
    out = model.generate(torch.randint(0, 40, (2, 10)), 30, temperature=0)
    assert out.shape == (2, 40)


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    assert torch.equal(sample_next(logits, 0.8, generator=gen(1)), sample_next(logits, 0.8, generator=gen(1)))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen(2)), logits.argmax(-1))
    # top-p keeps the smallest set of tokens whose probability reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = {int(sample_next(probs.log(), 1.0, top_p=0.8, generator=gen(s))) for s in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(probs.log(), 1.0, top_p=0.81, generator=gen(s))) for s in range(200)}
    assert picks == {0, 1, 2}
    seen = torch.zeros(1, 4, dtype=torch.bool)
    seen[0, 0] = True
    assert int(sample_next(probs.log() + 5, 0, repetition_penalty=2.0, seen=seen)) == 1


def test_vocab_limit_keeps_tokens_the_tokenizer_can_decode():
    """A checkpoint may have more rows than its tokenizer has ids (dlite: 50,260 for 50,257)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=70)).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    free = model.generate(idx, 40, temperature=2.0, generator=torch.Generator().manual_seed(0))
    limited = model.generate(idx, 40, temperature=2.0, generator=torch.Generator().manual_seed(0), vocab_limit=20)
    assert free[:, 1:].max() >= 20 and limited[:, 1:].max() < 20


def test_stop_ids_end_rows_and_pad_them():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=30)).eval()
    idx = torch.randint(0, 30, (3, 4))
    free = model.generate(idx, 20, temperature=0)[:, 4:]
    stop = int(free[0, 2])
    stopped = model.generate(idx, 20, temperature=0, stop_ids=[stop])[:, 4:]
    for row_free, row in zip(free, stopped):
        hits = (row_free == stop).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(row[:first + 1], row_free[:first + 1])
            assert (row[first:] == stop).all()


# ----------------------------------------------------------------------------- loader errors

def test_missing_and_misshapen_weights_name_the_key(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint()
    state = load_file(folder / "model.safetensors")
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}, broken / "model.safetensors")
    with pytest.raises(GrafitoError, match=r"missing 'h\.1\.mlp\.c_fc\.weight'"):
        GPT.from_pretrained(broken)
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    save_file(state, broken / "model.safetensors")
    with pytest.raises(GrafitoError, match=r"'h\.0\.attn\.c_attn\.weight' has shape \(96, 32\), expected \(32, 96\)"):
        GPT.from_pretrained(broken)


def test_missing_folder_and_offline_hub_errors(tmp_path):
    with pytest.raises(GrafitoError, match="no such model folder"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GrafitoError, match="has no config.json"):
        GPT.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                   "n_positions": 8, "vocab_size": 10}))
    with pytest.raises(GrafitoError, match="no weights"):
        GPT.from_pretrained(empty)
    # HF_HUB_OFFLINE=1 (conftest): nothing cached, so a clear error naming the local alternative
    with pytest.raises(GrafitoError, match=r"(?s)unreachable.*init_from=path/to/dir"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(GrafitoError, match=r"(?s)unreachable.*No local folder 'someone/fine-tune'"):
        GPT.from_pretrained("someone/fine-tune")


def test_non_gpt2_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GrafitoError, match="GPT-2 .* only"):
        GPT.from_pretrained(tmp_path)


def test_compiled_decode_step_gives_the_same_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=300, vocab_size=64)).eval()
    idx = torch.randint(0, 64, (2, 7))
    eager = model.generate(idx, 12, temperature=0)
    model.compile_decode()
    assert torch.equal(model.generate(idx, 12, temperature=0), eager)
    assert model._cache_length(19) == 256 and model._cache_length(290) == 300  # shapes bucketed, capped


def test_one_row_bf16_decoding_path_matches_the_linear_layers(monkeypatch):
    """model.linear's matrix-vector shortcut (bf16, one row, inference) computes what nn.Linear does."""
    import model as model_module

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(model_module.linear(layer, x).float(), layer(x).float(), rtol=2e-2, atol=2e-2)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=90)).to(torch.bfloat16)
    idx = torch.randint(0, 90, (1, 5))
    fast = gpt.generate(idx, 20, temperature=0)
    monkeypatch.setattr(model_module, "linear", lambda layer, x: layer(x))
    assert torch.equal(gpt.generate(idx, 20, temperature=0), fast)


def test_explicit_cpu_attention_equals_sdpa():
    from model import _causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    ours = _causal_attention(q, k, v, dropout=0.0)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    assert torch.allclose(ours, reference, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected))
