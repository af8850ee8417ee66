"""quantize.py: int8 and w8a8 layers stay close to the float ones (w8a8: equal to its block-quantized
reference), a quantized engine mostly keeps bf16's greedy tokens, and --quantize reaches sample.py,
serve.py and eval.py with one clear error where it cannot run."""

import copy
import subprocess
import sys

import pytest
import torch

import data
import engine
import eval as grafito_eval
import native
import quantize
import serve
import tokenizer
from common import GrafitoError
from conftest import ROOT
from engine import Engine, Sampling
import loss
from loss import masked_val_loss
from model import GPT
from quantize import Int8Linear, W8A8Linear
from test_engine import tiny_gpt


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def relative_error(y, reference):
    return ((y.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [256, 100])  # 100: not whole groups of 8, the kernel is left out
def test_int8_layer_output_is_close_to_the_float_layer(dtype, in_features):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, 384)
    with torch.no_grad():
        layer.weight[7] = 0  # an all-zero row (as the embedding's padding rows) stays zero, no NaN
        quantized = Int8Linear(layer, dtype)
        layer, quantized = layer.to(dtype), quantized.to(dtype)
        assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() == 127
        for rows in (1, 4, 16):
            x = torch.randn(2, rows, in_features, dtype=dtype)
            reference = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
            y = quantized(x)
            assert y.dtype == dtype and y.shape == reference.shape
            assert relative_error(y, reference) < 0.02
            # the quantization error is what the int8 weights hold: the dequantized weight's product equals it
            dequantized = torch.nn.functional.linear(x.float(), quantized.weight.float(), layer.bias.float())
            assert relative_error(y, dequantized) < (0.01 if dtype == torch.bfloat16 else 1e-5)
            assert torch.all(y[..., 7].float() == layer.bias[7].float())
            if quantized.kernel:  # one kernel for every row count: a row's output does not depend on the others
                assert torch.equal(quantized(x[:1, :1]), y[:1, :1])


def w8a8_reference(x, layer):
    """What W8A8Linear computes, in float64 from its definition: x in blocks of 32 (zeros pad the
    last), each scaled by its largest |value| / 127 and rounded to nearest even; int8 weights times
    per-row scales; bias."""
    x = x.float().reshape(-1, x.shape[-1])
    K = x.shape[1]
    blocks = torch.nn.functional.pad(x, (0, -K % 32)).view(x.shape[0], -1, 32)
    scales = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scales > 0, 1 / scales, 0)  # float32, as the kernel: x times 1/scale
    quantized = (torch.round(blocks * inverse).double() * scales.double()).view(x.shape[0], -1)[:, :K]
    weight = (layer.weight_uint8 ^ 0x80).view(torch.int8).double() * layer.scales.double()[:, None]
    bias = 0 if layer.bias is None else layer.bias.double()
    return quantized @ weight.T + bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [256, 100])  # 100: the last block of 32 and chunk of 64 padded
def test_w8a8_layer_equals_its_block_quantized_reference_and_a_row_does_not_depend_on_its_batch(dtype, in_features):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, 200)
    with torch.no_grad():
        layer.weight[7] = 0
        quantized = W8A8Linear(layer, dtype).to(dtype)
    x = torch.randn(16, in_features).to(dtype)
    x[0, 3] = 30.0  # an outlier: its block gets a coarse scale, the others keep theirs
    with torch.no_grad():
        y = quantized(x)
        reference = w8a8_reference(x, quantized)
        float_output = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert y.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: the output's rounding
        assert ((y.double() - reference).abs().max() / reference.abs().max()).item() < tolerance
        assert relative_error(y, float_output) < 0.02  # and the quantization itself costs little
        assert torch.all(y[:, 7].float() == quantized.bias[7].float())  # an all-zero weight row: its bias
        for rows in (slice(0, 1), slice(5, 6), slice(3, 10)):  # alone, or in a batch of another size
            assert torch.equal(quantized(x[rows]), y[rows])
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            assert torch.equal(quantized(x), y)  # nor on the thread count
        finally:
            torch.set_num_threads(threads)


def test_w8a8_vector_and_portable_kernels_give_the_same_bits(monkeypatch):
    if not quantize.w8a8_library().w8a8_vectorized():
        pytest.skip("this CPU lacks AVX-512 VNNI: only the portable kernel runs here (the test above checks it)")
    torch.manual_seed(0)
    layer = W8A8Linear(torch.nn.Linear(200, 70), torch.float32)  # a part chunk; 7 rows: groups of 4 and of 3
    x = torch.randn(7, 200)
    with torch.no_grad():
        vector = layer(x)
        portable = quantize.w8a8_library(("-mno-avx512vnni",))
        assert not portable.w8a8_vectorized()
        monkeypatch.setattr(quantize, "w8a8_library", lambda extra_flags=(): portable)
        assert torch.equal(layer(x), vector)


def test_w8a8_passes_nan_and_infinity_on():
    layer = W8A8Linear(torch.nn.Linear(64, 8), torch.float32)
    x = torch.randn(3, 64)
    x[1, 40], x[2, 5] = float("nan"), float("inf")
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()


def test_w8a8_follows_autocast_copies_and_changes_and_refuses_a_wrong_width():
    torch.manual_seed(0)
    layer = W8A8Linear(torch.nn.Linear(64, 8), torch.bfloat16)  # bf16 scales: the kernel reads float32 copies
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.float16):  # a dtype the kernel lacks: through float32
            half = layer(x)
        assert half.dtype == torch.float16 and torch.allclose(half.float(), expected, rtol=2e-3, atol=2e-3)
        copied = copy.deepcopy(layer)
        layer.weight_uint8.fill_(128)  # all-zero weights in the original only
        assert torch.equal(copied(x), expected) and torch.allclose(layer(x), layer.bias.expand(3, 8))
        copied.scales.mul_(2)  # an in-place change (as load_state_dict makes) is seen
        assert torch.allclose(copied(x) - copied.bias, 2 * (expected - layer.bias))
        with pytest.raises(ValueError, match="input of 32 features, expected 64"):
            layer(torch.randn(3, 32))


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_a_quantized_output_layer_computes_the_validation_loss_and_answer_log_probs_itself(method):
    model = quantize.quantize(tiny_gpt(n_embd=64, vocab_size=90), method, torch.float32)
    idx = torch.randint(0, 90, (2, 12))
    targets = torch.where(torch.rand(2, 12) < 0.5, idx.roll(-1, 1), -1)
    targets[1] = -1  # a row without an answer sums to 0
    with torch.no_grad():
        _, fused = model(idx, targets, reduction="sum")
        logits, _ = model(idx)  # through every quantized layer, the output layer included
        answers = loss.AnswerLogProbs(model)(idx, targets)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    token_log_probs = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(answers, (token_log_probs * (targets >= 0)).sum(1), atol=1e-5) and answers[1] == 0


def greedy_agreement(reference_engine, other_engine, prompts, steps):
    """The share of decode steps where other_engine's greedy token equals reference_engine's, both
    fed the reference's tokens (teacher forcing: one early difference does not count twice)."""
    agree = total = 0
    for prompt in prompts:
        caches = [e.new_cache(1, len(prompt) + steps) for e in (reference_engine, other_engine)]
        for e, cache in zip((reference_engine, other_engine), caches):
            e.prefill(cache, [0], [prompt[:-1]])
        token = prompt[-1]
        for _ in range(steps):
            expected, got = (int(e.decode(cache, [token])[0].argmax()) for e, cache in
                             zip((reference_engine, other_engine), caches))
            agree, total, token = agree + (expected == got), total + 1, expected
    return agree / total


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_a_quantized_engine_keeps_most_of_bf16_s_greedy_tokens(method):
    bf16 = Engine(tiny_gpt(n_embd=64, vocab_size=90).to(torch.bfloat16))
    model = quantize.quantize(tiny_gpt(n_embd=64, vocab_size=90), method, torch.bfloat16).to(torch.bfloat16)
    quantized = Engine(model)
    assert sum(isinstance(m, quantize.LAYERS[method]) for m in model.modules()) == 2 * 4 + 1  # the output layer too
    assert isinstance(model.transformer.wte.weight, torch.nn.Parameter)  # lookups keep the float embedding
    prompts = [[(7 * i + j) % 90 for j in range(3 + i)] for i in range(8)]
    agreement = greedy_agreement(bf16, quantized, prompts, 24)
    print(f"{method} vs bf16 greedy agreement: {agreement:.1%}")
    assert agreement >= 0.9
    # and the quantized engine's own answers follow its steps: batched rows equal each alone
    both = list(quantized.generate(prompts[:2], 12, Sampling(temperature=0)))
    for row, prompt in enumerate(prompts[:2]):
        alone = [step[0] for step in quantized.generate([prompt], 12, Sampling(temperature=0))]
        assert [step[row] for step in both] == alone


def test_int8_weights_cannot_be_trained():
    model = tiny_gpt()
    with pytest.raises(GrafitoError, match="put the model in eval mode"):
        quantize.quantize(model.train(), "int8", torch.float32)
    quantize.quantize(model.eval(), "int8", torch.float32)
    with pytest.raises(GrafitoError, match="cannot be trained"):
        model.lm_head(torch.randn(1, 32, requires_grad=True))


def test_quantize_is_checked_where_it_cannot_run():
    with pytest.raises(GrafitoError, match="quantize = 'int4' is invalid"):
        quantize.check("int4", "cpu")
    with pytest.raises(GrafitoError, match="CPUs only"):
        quantize.check("int8", "cuda:0")
    with pytest.raises(GrafitoError, match="leave out --compile"):
        quantize.check("int8", "cpu", compile=True)
    with pytest.raises(GrafitoError, match="CPUs only"):
        quantize.check("w8a8", "cuda:0")
    quantize.check("", "cuda:0", compile=True)  # nothing to check without --quantize


def test_w8a8_says_what_it_needs_where_the_cpu_or_the_compiler_lacks_it(monkeypatch, tmp_path):
    class WithoutVNNI:
        w8a8_vectorized = staticmethod(lambda: 0)
    monkeypatch.setattr(quantize, "w8a8_library", lambda extra_flags=(): WithoutVNNI())
    with pytest.raises(GrafitoError, match="AVX-512 VNNI.*use --quantize=int8"):
        quantize.check("w8a8", "cpu")
    monkeypatch.undo()
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang to be found
    monkeypatch.setenv("GRAFITO_KERNEL_CACHE", str(tmp_path / "kernels"))
    quantize.w8a8_library.cache_clear()
    native.load.cache_clear()
    try:
        with pytest.raises(GrafitoError, match="no C compiler was found: install one"):
            quantize.check("w8a8", "cpu")
    finally:
        quantize.w8a8_library.cache_clear()
        native.load.cache_clear()


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_sample_quantizes_from_the_command_line(tiny_model_dir, method):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--raw", "--start=Once upon",
                        "--max_new_tokens=5", "--device=cpu", f"--quantize={method}", "--verbose")
    if method == "w8a8" and not quantize.w8a8_library().w8a8_vectorized():  # a CPU without AVX-512 VNNI
        assert result.returncode == 2 and "use --quantize=int8" in result.stderr and "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--quantize=int8", "--compile")
    assert result.returncode == 2 and "leave out --compile" in result.stderr and "Traceback" not in result.stderr


def test_serve_loads_a_quantized_engine_and_refuses_before_listening(tiny_model_dir):
    model_engine = engine.load_engine({**serve.DEFAULTS, "init_from": str(tiny_model_dir), "device": "cpu",
                                       "quantize": "int8"})
    linears = [m for m in model_engine.model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    assert model_engine.model.lm_head.scales.dtype == model_engine.dtype == torch.bfloat16
    result = run_script(ROOT / "serve.py", f"--init_from={tiny_model_dir}", "--quantize=int8", "--compile",
                        "--port=1")
    assert result.returncode == 2 and "leave out --compile" in result.stderr and "Traceback" not in result.stderr


def test_eval_measures_the_quantized_model(tiny_model_dir, tmp_path, monkeypatch):
    conversations = [[(f"who is person {i}", f"name {i}")] for i in range(4)]
    data.write_dataset(tmp_path / "a", {"train": tokenizer.render_batch(conversations),
                                        "val": tokenizer.render_batch(conversations)}, {"dataset": "a", "block_size": 64})
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    config = {**grafito_eval.DEFAULTS, "device": "cpu", "dtype": "bfloat16", "max_new_tokens": 2, "quantize": "int8"}
    grafito_eval.check_config(config)
    result = grafito_eval.evaluate_model("tiny", tiny_model_dir, config, ["hi"], [], ["a"])
    batches = data.eval_batches(data.load_split("a", "val"), 64, config["batch_size"])
    model = GPT.from_pretrained(tiny_model_dir).eval()
    bf16 = masked_val_loss(model, batches, "cpu", "bfloat16")
    quantized = masked_val_loss(quantize.quantize(model, "int8", torch.bfloat16), batches, "cpu", "bfloat16")
    assert result["quantize"] == "int8" and result["val"]["a"]["loss"] == pytest.approx(quantized, abs=1e-6)
    assert quantized != bf16 and quantized == pytest.approx(bf16, rel=0.01)
