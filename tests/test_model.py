"""GPT-2 numerics against transformers, and reading and writing its weights."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import GrafitoError
from model import GPT, GPTConfig


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


def test_a_folder_without_config_or_weights_is_a_clear_error(tmp_path):
    with pytest.raises(GrafitoError, match="has no config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                      "n_positions": 8, "vocab_size": 10}))
    with pytest.raises(GrafitoError, match="no weights"):
        GPT.from_pretrained(tmp_path)


def test_non_gpt2_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GrafitoError, match="GPT-2 .* only"):
        GPT.from_pretrained(tmp_path)


GOOD_CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 97}


@pytest.mark.parametrize("text,message", [
    ("{ not json", "not a readable JSON file"),
    ("", "not a readable JSON file"),
    ("[]", "expected a JSON object"),
    (json.dumps({**GOOD_CONFIG, "layer_norm_epsilon": "abc"}), "layer_norm_epsilon = 'abc' is invalid"),
    (json.dumps({**GOOD_CONFIG, "n_layer": True}), "n_layer = True is invalid: must be an integer"),
    (json.dumps({**GOOD_CONFIG, "n_positions": 1e13}), "n_positions = 10000000000000.0 is invalid"),
    (json.dumps({**GOOD_CONFIG, "n_embd": 33}), "not divisible by n_head"),
    (json.dumps({**GOOD_CONFIG, "activation_function": "mish"}), "activation_function='mish'"),
])
def test_a_malformed_config_json_is_one_error_naming_the_file(hf_checkpoint, text, message):
    folder, _ = hf_checkpoint()
    (folder / "config.json").write_text(text)
    with pytest.raises(GrafitoError, match=re.escape(message)) as err:
        GPT.from_pretrained(folder)
    assert "config.json" in str(err.value)


def test_binary_config_json_is_one_error(hf_checkpoint):
    folder, _ = hf_checkpoint()
    (folder / "config.json").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(GrafitoError, match="not a readable JSON file"):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_or_boolean_weights_are_refused(hf_checkpoint, dtype):
    folder, _ = hf_checkpoint()
    state = load_file(folder / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].to(dtype)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(GrafitoError, match=r"'h\.0\.mlp\.c_fc\.weight' holds torch\.\w+ values"):
        GPT.from_pretrained(folder)


def test_a_malformed_shard_index_is_one_error(hf_checkpoint):
    folder, _ = hf_checkpoint()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(GrafitoError, match="weight_map"):
        GPT.from_pretrained(folder)


def test_sharded_weights_load(hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint()
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    (folder / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    idx = torch.randint(0, 97, (1, 16))
    assert (GPT.from_pretrained(folder).eval()(idx)[0] - hf_logits(hf, idx)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- GPT-2-family variants

VARIANTS = {  # transformers GPT2Config settings grafito runs exactly
    "exact GELU (Cerebras-GPT)": dict(activation_function="gelu"),
    "MLP width 3 x n_embd": dict(n_inner=96),
    "2048 positions, context cropped to 40": dict(n_positions=2048),
    "ReLU": dict(activation_function="relu"),
    "quick GELU": dict(activation_function="quick_gelu"),
}


def hf_variant(tmp_path, **settings):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 97, **settings})
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(tmp_path / "variant")
    return tmp_path / "variant", hf


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gpt2_family_variants_match_transformers(tmp_path, name):
    folder, hf = hf_variant(tmp_path, **VARIANTS[name])
    block = 40 if "n_positions" in VARIANTS[name] else None
    model = GPT.from_pretrained(folder, **({"block_size": block} if block else {})).eval()
    idx = torch.randint(0, 97, (2, block or 64))
    assert (model(idx)[0] - hf_logits(hf, idx)).abs().max().item() <= 1e-4


def test_a_variant_saved_by_grafito_loads_back_in_transformers_with_its_settings(tmp_path):
    from transformers import GPT2LMHeadModel

    folder, hf = hf_variant(tmp_path, activation_function="gelu", n_inner=96, n_positions=128)
    GPT.from_pretrained(folder).save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (saved["activation_function"], saved["n_inner"], saved["n_positions"]) == ("gelu", 96, 128)
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 97, (2, 30))
    assert (hf_logits(again, idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("settings,message", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
])
def test_unsupported_variants_are_refused_naming_the_key(tmp_path, settings, message):
    folder, _ = hf_variant(tmp_path, **settings)
    with pytest.raises(GrafitoError, match=message):
        GPT.from_pretrained(folder)
