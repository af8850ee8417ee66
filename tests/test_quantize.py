"""quantize.py: int8 layers stay close to the float ones, a quantized engine mostly keeps bf16's greedy
tokens, and --quantize reaches sample.py, serve.py and eval.py with one clear error where it cannot run."""

import subprocess
import sys

import pytest
import torch

import data
import engine
import eval as grafito_eval
import quantize
import serve
import tokenizer
from common import GrafitoError
from conftest import ROOT
from engine import Engine, Sampling
from loss import masked_val_loss
from model import GPT
from quantize import Int8Linear
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


def test_a_quantized_engine_keeps_most_of_bf16_s_greedy_tokens():
    bf16 = Engine(tiny_gpt(n_embd=64, vocab_size=90).to(torch.bfloat16))
    int8 = Engine(quantize.quantize(tiny_gpt(n_embd=64, vocab_size=90), "int8", torch.bfloat16).to(torch.bfloat16))
    assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == 2 * 4 + 1  # the output layer too
    assert isinstance(int8.model.transformer.wte.weight, torch.nn.Parameter)  # lookups keep the float embedding
    prompts = [[(7 * i + j) % 90 for j in range(3 + i)] for i in range(8)]
    agreement = greedy_agreement(bf16, int8, prompts, 24)
    print(f"int8 vs bf16 greedy agreement: {agreement:.1%}")
    assert agreement >= 0.9
    # and the quantized engine's own answers follow its steps: batched rows equal each alone
    both = list(int8.generate(prompts[:2], 12, Sampling(temperature=0)))
    for row, prompt in enumerate(prompts[:2]):
        alone = [step[0] for step in int8.generate([prompt], 12, Sampling(temperature=0))]
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
    quantize.check("", "cuda:0", compile=True)  # nothing to check without --quantize


def test_sample_quantizes_from_the_command_line(tiny_model_dir):
    result = run_script(ROOT / "sample.py", f"--init_from={tiny_model_dir}", "--raw", "--start=Once upon",
                        "--max_new_tokens=5", "--device=cpu", "--quantize=int8", "--verbose")
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
