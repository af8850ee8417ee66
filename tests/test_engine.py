"""engine.py: the KV cache and decode loop equal a full forward, batching changes nothing, sampling rules."""

import pytest
import torch

import engine
import native
from common import GrafitoError
from engine import Engine, KVCache, Sampling, naive_generate, sample
from model import GPT, GPTConfig

GREEDY = Sampling(temperature=0)


def attention_decides(model):
    """A random tiny GPT-2 barely uses attention: its next token hardly depends on the keys it
    reads, so a KV cache holding the wrong keys (stale lengths, rows mixed up) would still give
    the right answers. Queries and keys scaled by 8 make its attention sharp, values and the
    attention output by 5 make what it reads outweigh the MLP and the embeddings: the answer
    then depends on the context, token by token."""
    with torch.no_grad():
        for block in model.transformer.h:
            C = block.attn.c_attn.weight.shape[1]
            for part, scale in ((slice(0, 2 * C), 8.0), (slice(2 * C, 3 * C), 5.0)):  # (q, k), v
                block.attn.c_attn.weight[part] *= scale
                block.attn.c_attn.bias[part] *= scale
            block.attn.c_proj.weight *= 5.0
    return model


def tiny_gpt(seed=0, **config):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 60, **config}))
    return attention_decides(model).eval()


def rows_of(steps, row):
    return [tokens[row] for tokens in steps if tokens[row] is not None]


def test_prefill_then_decode_steps_equal_a_full_forward():
    model = tiny_gpt(n_layer=3, n_head=4, n_embd=64, block_size=40, vocab_size=80)
    idx = torch.randint(0, 80, (2, 40))
    full, _ = model(idx)
    model_engine = Engine(model)
    cache = model_engine.new_cache(2, 40)
    model_engine.prefill(cache, [0, 1], idx[:, :7].tolist())
    steps = [model_engine.decode(cache, idx[:, t].tolist()) for t in range(7, 40)]
    assert (torch.stack(steps, dim=1) - full[:, 7:]).abs().max().item() < 1e-5


def test_rows_of_different_lengths_decode_as_each_row_alone():
    model = tiny_gpt()
    prompts = [torch.randint(0, 60, (n,)).tolist() for n in (5, 11, 1)]
    batched = list(Engine(model).generate(prompts, 12, GREEDY))
    for row, prompt in enumerate(prompts):
        alone = list(Engine(model).generate([prompt], 12, GREEDY))
        assert rows_of(batched, row) == rows_of(alone, 0)
    assert len({tuple(rows_of(batched, row)) for row in range(3)}) == 3  # each row's own answer


@pytest.mark.parametrize("variant", [{}, {"activation_function": "gelu", "n_inner": 96}])  # GPT-2; Cerebras-GPT-like
def test_greedy_generation_equals_the_uncached_reference_and_transformers(hf_checkpoint, variant):
    folder, hf = hf_checkpoint(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=113, **variant)
    model = GPT.from_pretrained(folder).eval()
    prompts = torch.randint(0, 113, (2, 9))
    steps = list(Engine(model).generate(prompts.tolist(), 40, GREEDY))
    theirs = hf.generate(prompts, max_new_tokens=40, do_sample=False, pad_token_id=0)[:, 9:]
    for row in range(2):
        assert rows_of(steps, row) == naive_generate(model, prompts[row].tolist(), 40) == theirs[row].tolist()


NO_REPEATS = Sampling(temperature=0, repetition_penalty=100.0)  # greedy among the tokens not seen yet


def no_repeats_reference(model, context, n, seen):
    """NO_REPEATS without a cache: a full forward over `context` and the tokens added so far, every step."""
    context, seen, tokens = list(context), set(seen), []
    for _ in range(n):
        mask = torch.zeros(1, model.config.vocab_size, dtype=torch.bool)
        mask[0, list(seen)] = True
        with torch.no_grad():
            token = int(sample(model(torch.tensor([context]))[0][:, -1], NO_REPEATS, mask))
        context.append(token), seen.add(token), tokens.append(token)
    return tokens


def test_a_row_past_the_context_restarts_from_its_recent_tokens_without_changing_the_others():
    # greedy answers of a random tiny model soon repeat one token, and a repeated token hides what a
    # restart keeps (a token fed twice changes nothing); barring repeats makes every token count
    model = tiny_gpt(block_size=16)
    long_prompt, short_prompt = torch.randint(0, 60, (12,)).tolist(), [3]
    steps = list(Engine(model).generate([long_prompt, short_prompt], 10, NO_REPEATS))
    # the short row never filled its context: exactly its continuation, as if alone
    assert rows_of(steps, 1) == no_repeats_reference(model, short_prompt, 10, short_prompt)
    # the long row: its continuation while its 12 + 4 tokens fit the context; its 5th token finds the
    # context full with 5 tokens to go, so it restarts from its last 16 - 5 = 11 tokens (as many as leave
    # room for the rest of the answer) and goes on as a full forward over those alone
    long_row = rows_of(steps, 0)
    assert long_row[:5] == no_repeats_reference(model, long_prompt, 5, long_prompt)
    so_far = long_prompt + long_row[:5]
    assert long_row[5:] == no_repeats_reference(model, so_far[-11:], 5, so_far)


def test_generation_memory_follows_the_context_not_max_new_tokens():
    steps = Engine(tiny_gpt(block_size=16)).generate([[1, 2, 3]], 10 ** 12, GREEDY)
    assert len([next(steps) for _ in range(40)]) == 40  # no buffer of 10^12 tokens was allocated


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating():
    with pytest.raises(GrafitoError, match="a KV cache for 100000000 rows needs about"):
        Engine(tiny_gpt()).new_cache(10 ** 8, 64)


def test_a_row_that_stops_with_a_full_context_leaves_the_others_going():
    model = tiny_gpt(block_size=32)
    for seed in range(50):  # a prompt whose first two greedy tokens differ: the second one stops it
        torch.manual_seed(seed)
        full, short = torch.randint(0, 60, (31,)).tolist(), torch.randint(0, 60, (5,)).tolist()
        first = rows_of(Engine(model).generate([full], 2, GREEDY), 0)
        if first[0] != first[1]:
            break
    stop = {first[1]}  # comes when the row holds all 32 positions
    both = list(Engine(model).generate([full, short], 10, GREEDY, stop_ids=stop))
    assert rows_of(both, 0) == first
    assert rows_of(both, 1) == rows_of(Engine(model).generate([short], 10, GREEDY, stop_ids=stop), 0)


def test_stop_ids_end_a_row_and_it_yields_none_afterwards():
    model = tiny_gpt(vocab_size=30)
    prompts = torch.randint(0, 30, (3, 4)).tolist()
    free = list(Engine(model).generate(prompts, 20, GREEDY))
    stop = free[5][0]
    stopped = list(Engine(model).generate(prompts, 20, GREEDY, stop_ids=[stop]))
    for row in range(3):
        tokens = rows_of(free, row)
        if stop in tokens:
            first = tokens.index(stop)
            assert rows_of(stopped, row) == tokens[:first + 1]
            assert all(step[row] is None for step in stopped[first + 1:])
        else:  # a row that never produces the stop token runs on, whoever else stopped
            assert rows_of(stopped, row) == tokens
    assert sum(stop in rows_of(free, row) for row in range(3)) in (1, 2)  # rows of both kinds


def test_vocab_limit_keeps_tokens_the_tokenizer_can_decode():
    """A checkpoint may have more rows than its tokenizer has ids (dlite: 50,260 for 50,257)."""
    model = tiny_gpt(vocab_size=70)
    hot = Sampling(temperature=2.0)
    free = list(Engine(model).generate([[0], [0]], 40, hot, generator=torch.Generator().manual_seed(0)))
    limited = list(Engine(model).generate([[0], [0]], 40, hot, generator=torch.Generator().manual_seed(0),
                                          vocab_limit=20))
    assert max(max(s) for s in free) >= 20 and max(max(s) for s in limited) < 20


def test_same_seed_same_samples():
    model = tiny_gpt()
    run = lambda seed: list(Engine(model).generate([[1, 2]] * 3, 12, Sampling(temperature=1.0),
                                                   generator=torch.Generator().manual_seed(seed)))
    assert run(5) == run(5) != run(6)


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    assert torch.equal(sample(logits, Sampling(top_k=1), generators=gen(2)), logits.argmax(-1))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # top-p keeps the smallest set reaching p
    assert {int(sample(probs.log(), Sampling(top_p=0.8), generators=gen(s))) for s in range(200)} == {0, 1}
    assert {int(sample(probs.log(), Sampling(top_p=0.81), generators=gen(s))) for s in range(200)} == {0, 1, 2}
    assert {int(sample(probs.log(), Sampling(top_k=2), generators=gen(s))) for s in range(200)} == {0, 1}
    seen = torch.tensor([[True, False, False, False]])
    assert int(sample(probs.log() + 5, Sampling(temperature=0, repetition_penalty=2.0), seen=seen)) == 1


def test_samples_follow_the_distribution_and_temperature_sharpens_it():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    draws = sample(probs.log().expand(20000, 5), Sampling(), generators=torch.Generator().manual_seed(0))
    assert (torch.bincount(draws, minlength=5) / 20000 - probs[0]).abs().max() < 0.015
    cold = sample(probs.log().expand(20000, 5), Sampling(temperature=0.5), generators=torch.Generator().manual_seed(0))
    sharpened = probs[0] ** 2 / (probs[0] ** 2).sum()
    assert (torch.bincount(cold, minlength=5) / 20000 - sharpened).abs().max() < 0.015
    # top_k keeps every token tied with its k-th, as masking the others would
    tied = sample(torch.tensor([[1.0, 0.0, 1.0, 1.0, -1.0]]).expand(30000, 5), Sampling(top_k=2),
                  generators=torch.Generator().manual_seed(0))
    assert (torch.bincount(tied, minlength=5) / 30000 - torch.tensor([1, 0, 1, 1, 0]) / 3).abs().max() < 0.015
    # top_k: drawn among the k candidates only (their own pass), renormalised; top_p on top of it
    shuffled = torch.tensor([[0.15, 0.05, 0.5, 0.0, 0.3]]).log().expand(20000, 5)  # token ids not in order of mass
    kept = sample(shuffled, Sampling(top_k=3), generators=torch.Generator().manual_seed(0))
    assert (torch.bincount(kept, minlength=5) / 20000 - torch.tensor([0.15, 0, 0.5, 0, 0.3]) / 0.95).abs().max() < 0.015
    nucleus = sample(shuffled, Sampling(top_k=3, top_p=0.7), generators=torch.Generator().manual_seed(0))
    assert (torch.bincount(nucleus, minlength=5) / 20000 - torch.tensor([0, 0, 0.625, 0, 0.375])).abs().max() < 0.015


MIXED = [Sampling(temperature=0), Sampling(temperature=0.8, top_k=5), Sampling(temperature=1.2, top_p=0.7),
         Sampling(temperature=1.0, repetition_penalty=1.5), Sampling(temperature=0, repetition_penalty=1.3),
         Sampling(temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=0.8), Sampling(temperature=2.0),
         Sampling(temperature=0.8, top_k=5), Sampling(temperature=0.8, top_k=5, top_p=0.8)]  # groups of one top_k


def test_one_batched_call_gives_every_row_the_token_it_gets_alone():
    """Per-row settings and generators: a row's tokens never depend on its neighbours' settings or draws."""
    torch.manual_seed(0)
    B, V, steps = len(MIXED), 40, 30
    logits, seen = torch.randn(steps, B, V) * 3, torch.rand(B, V) < 0.3
    batched_generators = [torch.Generator().manual_seed(100 + row) for row in range(B)]
    batched = [sample(logits[t], MIXED, seen, batched_generators) for t in range(steps)]
    for row in range(B):
        generator = torch.Generator().manual_seed(100 + row)
        alone = [sample(logits[t, row:row + 1], MIXED[row], seen[row:row + 1], [generator]) for t in range(steps)]
        assert [int(b[row]) for b in batched] == [int(a) for a in alone]
    assert len({int(b[2]) for b in batched}) > 3  # the sampled rows do sample


def test_a_row_with_non_finite_logits_is_flagged_alone():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    logits[3, 7] = 1e36  # finite, but overflows once divided by its temperature
    rows = [Sampling(temperature=0.7), Sampling(temperature=0.7), Sampling(), Sampling(temperature=0.001),
            Sampling(temperature=0.9, top_p=1e-300)]  # top_p is 0 in float32: the nucleus keeps the top token
    tokens = sample(logits, rows, generators=[torch.Generator().manual_seed(i) for i in range(5)]).tolist()
    assert tokens[1:4] == [engine.BAD_LOGITS] * 3
    assert 0 <= tokens[0] < 30 and tokens[4] == int(logits[4].argmax())
    # the same through the top_k candidates' pass
    rows = [Sampling(temperature=t, top_k=5, top_p=p) for t, p in ((0.7, 1), (0.7, 1), (1, 1), (0.001, 1), (0.9, 1e-300))]
    tokens = sample(logits, rows, generators=[torch.Generator().manual_seed(i) for i in range(5)]).tolist()
    assert tokens[1:4] == [engine.BAD_LOGITS] * 3
    assert 0 <= tokens[0] < 30 and tokens[4] == int(logits[4].argmax())


@pytest.mark.parametrize("settings", [dict(temperature=float("nan")), dict(temperature=1e-45), dict(temperature=-1),
                                      dict(top_p=0.0), dict(top_p=float("inf")), dict(top_k=-1),
                                      dict(repetition_penalty=float("nan")), dict(repetition_penalty=0)])
def test_bad_sampling_settings_are_one_clear_error(settings):
    with pytest.raises(GrafitoError, match="is invalid"):
        Sampling(**settings)


def test_non_finite_logits_are_one_clear_error():
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(GrafitoError, match="NaN or infinite logits"):
        list(Engine(model).generate([[1, 2]], 3, Sampling(temperature=1.0)))


def test_compiled_decode_steps_give_the_eager_tokens_and_a_batcher_compiles_every_size_before_its_jobs():
    model = tiny_gpt(block_size=256, vocab_size=64)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (7, 2, 12)]
    eager = list(Engine(model).generate(prompts[:2], 12, GREEDY))
    compiled = Engine(model, compile=True)
    assert list(compiled.generate(prompts[:2], 12, GREEDY)) == eager
    assert compiled.new_cache(1, 19).max_len == 256 and compiled.new_cache(1, 250).max_len == 256  # bucketed, capped
    # the batcher (serve --compile): steps over 1, 2 or 4 rows, the rows past the busy ones idle
    batcher = engine.Batcher(compiled, max_batch=4)
    assert batcher.sizes == [1, 2, 4]
    batcher.warm_up()
    jobs = [engine.Job(p, n, GREEDY, lambda text, finish: None, raw=True) for p, n in zip(prompts, (20, 6, 14))]
    with torch._dynamo.config.patch(error_on_recompile=True):  # every size is compiled already
        for step in range(40):
            batcher.step(jobs[:2] if step == 0 else jobs[2:] if step == 3 else ())
    assert batcher.busy == 0 and batcher.peak_busy == 3
    for prompt, job in zip(prompts, jobs):
        alone = [tokens[0] for tokens in Engine(model).generate([prompt], job.max_new_tokens, GREEDY)]
        assert job.history[len(prompt):] == alone


def test_a_compiled_batcher_has_one_graph_per_power_of_two_and_a_recompile_limit_that_holds_them():
    # config.patch, not monkeypatch: pytest's undo deletes the attribute, which hides torch's own setting
    with torch._dynamo.config.patch(recompile_limit=8):  # torch's default: 128 rows at most
        batcher = engine.Batcher(Engine(tiny_gpt(), compile=True), max_batch=1000)  # nothing compiles yet
        assert batcher.sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
        assert torch._dynamo.config.recompile_limit > len(batcher.sizes)
    assert engine.Batcher(Engine(tiny_gpt()), max_batch=5).sizes == [1, 2, 3, 4, 5]  # eager: any count


def test_one_row_products_with_onednn_off_equal_onednn_s():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x).float()
        with engine.onednn_off():
            assert not torch.backends.mkldnn.enabled
            native = layer(x).float()
    assert torch.backends.mkldnn.enabled  # restored
    assert torch.allclose(native, expected, rtol=2e-2, atol=2e-2)


def test_bf16_cpu_engine_turns_onednn_off_for_one_row_steps_where_faster(monkeypatch):
    monkeypatch.setattr(engine, "native_one_row_is_faster", lambda rows, cols, dtype: False)
    assert not Engine(tiny_gpt(n_embd=64, vocab_size=90).to(torch.bfloat16)).native_one_row
    monkeypatch.setattr(engine, "native_one_row_is_faster", lambda rows, cols, dtype: True)
    model_engine = Engine(tiny_gpt(n_embd=64, vocab_size=90).to(torch.bfloat16))
    assert model_engine.native_one_row
    assert Engine(tiny_gpt(n_embd=64, vocab_size=90).to(torch.bfloat16), compile=True).native_one_row  # compiled too
    seen = []
    step = model_engine._step
    model_engine._step = lambda tokens, cache: seen.append(torch.backends.mkldnn.enabled) or step(tokens, cache)
    prompt = [1, 2, 3, 4, 5]
    two_rows = list(model_engine.generate([prompt, prompt], 20, GREEDY))  # oneDNN's GEMM
    one_row = list(model_engine.generate([prompt], 20, GREEDY))  # the matrix-vector kernel
    assert seen == [True] * 20 + [False] * 20 and torch.backends.mkldnn.enabled
    assert rows_of(one_row, 0) == rows_of(two_rows, 0)


def test_kv_cache_slots_hold_their_own_lengths():
    model = tiny_gpt()
    cache = KVCache(model.config, 3, 16, "cpu", torch.float32)
    Engine(model).prefill(cache, [0, 2], [[1, 2, 3], []])
    assert cache.lengths == [3, 0, 0] and cache.positions.tolist() == [3, 0, 0]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [16, 10])  # 10: not whole vectors, the kernel's other path
def test_the_decode_attention_kernel_equals_pytorch_s_attention_and_a_row_does_not_depend_on_its_batch(head_size,
                                                                                                       cache_dtype):
    kernel = engine.decode_attention_kernel()
    if kernel is None:
        pytest.skip("no C compiler here: decode steps attend through PyTorch (the test below)")
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=4 * head_size, block_size=32, vocab_size=60)

    def cache_of(keys, values, counts, window):
        cache = KVCache(config, keys.shape[0], 32, "cpu", cache_dtype)
        cache.keys[1].copy_(keys)
        cache.values[1].copy_(values)
        cache.kernel, cache.window, cache.counts = kernel, window, torch.tensor(counts)
        return cache

    keys, values = 3 * torch.randn(3, 4, 32, head_size), torch.randn(3, 4, 32, head_size)  # sharp: a few keys decide
    keys, values = keys.to(cache_dtype).float(), values.to(cache_dtype).float()  # what the cache holds
    q = 3 * torch.randn(3, 4, 1, head_size)
    counts = [20, 7, 1]
    y = cache_of(keys, values, counts, 20).attend(1, q)
    mask = (torch.arange(20)[None, :] < torch.tensor(counts)[:, None])[:, None, None, :]
    reference = torch.nn.functional.scaled_dot_product_attention(q, keys[:, :, :20], values[:, :, :20], attn_mask=mask)
    assert (y - reference).abs().max() < 1e-5
    assert not torch.allclose(y[1], torch.nn.functional.scaled_dot_product_attention(q[1:2], keys[1:2, :, :20],
                                                                                      values[1:2, :, :20])[0])
    row = 1  # alone, in a cache of another length and window, and on another thread count: the same bits
    alone = cache_of(keys[row:row + 1], values[row:row + 1], [counts[row]], 9).attend(1, q[row:row + 1])
    assert torch.equal(alone[0], y[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert torch.equal(cache_of(keys, values, counts, 20).attend(1, q), y)
    finally:
        torch.set_num_threads(threads)


def test_without_a_c_compiler_decode_steps_attend_through_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GRAFITO_KERNEL_CACHE", str(tmp_path / "kernels"))
    engine.decode_attention_kernel.cache_clear()
    native.load.cache_clear()
    try:
        model = tiny_gpt()
        model_engine = Engine(model)
        assert model_engine.attention_kernel is None
        prompt = [1, 2, 3, 4, 5]
        assert rows_of(list(model_engine.generate([prompt], 20, GREEDY)), 0) == naive_generate(model, prompt, 20)
    finally:
        engine.decode_attention_kernel.cache_clear()
        native.load.cache_clear()


class AlwaysMaskedCache(KVCache):
    """Every decode step through the general path: a mask and per-slot indexed writes."""
    masked = property(lambda self: True, lambda self, value: None)


def test_slots_of_one_length_decode_unmasked_exactly_as_with_the_mask(monkeypatch):
    model = tiny_gpt(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=80)
    idx = torch.randint(0, 80, (2, 40)).tolist()

    def decode_all():
        model_engine = Engine(model)
        cache = model_engine.new_cache(2, 48)
        model_engine.prefill(cache, [0, 1], [row[:9] for row in idx])
        return torch.stack([model_engine.decode(cache, [row[t] for row in idx]) for t in range(9, 40)])

    unmasked = decode_all()
    monkeypatch.setattr(engine, "KVCache", AlwaysMaskedCache)
    assert torch.equal(unmasked, decode_all())


@pytest.mark.parametrize("c_kernel", [True, False])
def test_a_half_precision_cpu_engine_attends_in_float32_and_matches_the_full_forward(c_kernel, monkeypatch):
    """A decode step of a bf16 engine on a CPU attends in float32: through the C kernel, which
    reads the bf16 cache as it is, or, without it, through PyTorch's float32 kernel (much faster
    than its bf16 one for one query) over a cache widened to float32. Either way the steps must
    give the logits of the model's own forward."""
    if c_kernel and engine.decode_attention_kernel() is None:
        pytest.skip("no C compiler here")
    if not c_kernel:
        monkeypatch.setattr(engine, "decode_attention_kernel", lambda: None)
    model = tiny_gpt(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=80).to(torch.bfloat16)
    model_engine = Engine(model)
    idx = torch.randint(0, 80, (2, 40))
    lengths = [40, 23]  # the second row stops early: later steps mix lengths (masked)
    cache = model_engine.new_cache(2, 48)
    assert cache.keys[0].dtype == cache.values[0].dtype == (torch.bfloat16 if c_kernel else torch.float32)
    model_engine.prefill(cache, [0, 1], idx[:, :7].tolist())
    steps = [model_engine.decode(cache, idx[:, t].tolist(), [t < n for n in lengths]) for t in range(7, 40)]
    with torch.no_grad():
        full, _ = model(idx)
    decoded = torch.stack(steps, dim=1).float()
    for row, n in enumerate(lengths):
        error = (decoded[row, :n - 7] - full[row, 7:n].float()).abs().max().item()
        assert error < 0.05 * full[row].float().abs().max().item()
    # float32 attention leaves only the products' bf16 rounding: closer than the bf16 forward's own
    exact, _ = tiny_gpt(n_layer=3, n_head=4, n_embd=64, block_size=48, vocab_size=80).to(torch.bfloat16).float()(idx)
    assert (decoded[0] - exact[0, 7:]).abs().max() <= (full[0, 7:].float() - exact[0, 7:]).abs().max() * 1.5
