"""GPT-2: the configuration, the network, and reading and writing its weights in the
Hugging Face layout that OpenAI's checkpoints use.

Numerics follow GPT-2 as transformers implements it: GELU (tanh approximation unless the
config says otherwise), LayerNorm eps from the config, tied token embedding and output
weights, attention through scaled_dot_product_attention (flash kernels on GPUs; an eager CPU
decode step through engine.py's C kernel where it builds).
Generation lives in engine.py, the fused output layer + loss in loss.py, and where a model
comes from (hub, folder, training run) in checkpoint.py.
"""

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import loss
from common import GrafitoError
from configurator import check_options, integer, number, one_of

PRESETS = {  # OpenAI's four sizes; all use block_size 1024 and the 50257-token BPE
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# transformers' names for the MLP activations GPT-2 configs use
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # OpenAI's GPT-2
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,  # exact, e.g. Cerebras-GPT
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = None  # MLP width; None is GPT-2's 4 * n_embd
    activation: str = "gelu_new"
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases; False only for models trained from scratch
    layer_norm_epsilon: float = 1e-5
    vocab_multiple: int = 64  # embedding rows padded to a multiple of this (faster GPU matmuls)

    def __post_init__(self):
        self.check()

    def check(self, where="model config"):
        check_config_values(vars(self), where)

    @property
    def mlp_width(self):
        return self.n_inner or 4 * self.n_embd

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise GrafitoError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def check_config_values(values, where, names=None):
    sizes = integer(1, 1 << 20)
    check_options(values, {
        "block_size": sizes, "vocab_size": integer(1, 1 << 24), "n_layer": integer(1, 4096),
        "n_head": integer(1, 4096), "n_embd": sizes, "vocab_multiple": integer(1, 4096),
        "dropout": number(0.0, 1.0, high_open=True), "layer_norm_epsilon": number(0.0, 1.0),
        "activation": one_of(*ACTIVATIONS), "bias": (lambda v: type(v) is bool, "true or false"),
        "n_inner": (lambda v: v is None or (type(v) is int and 1 <= v <= 1 << 20), "null or a positive integer"),
    }, where, names)
    if values["n_embd"] % values["n_head"]:
        raise GrafitoError(f"{where}: n_embd={values['n_embd']} is not divisible by n_head={values['n_head']}")


# ----------------------------------------------------------------------------- the network

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.layer_idx = config.n_head, config.dropout, layer_idx

    def forward(self, x, cache=None, mask=None):
        """Causal attention over this call's tokens (training, a prefill), or a decode step's
        attention over the cache's keys, with mask (B, 1, T, keys) or, where every key counts, None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        causal = cache is None or cache.prefilling
        if cache is not None:  # a decode step's keys may be held in float32 (engine.Engine.cache_dtype)
            k, v = cache.update(self.layer_idx, k, v)
        # CPUs skip attention-probability dropout: no CPU kernel fuses it, so it would build and draw B*H*T*T
        # probabilities per layer; residual and embedding dropout still apply (docs/performance.md)
        dropout = self.dropout if self.training and q.device.type != "cpu" else 0.0
        if cache is not None and not causal and cache.kernel is not None:  # a CPU decode step: engine.py's C kernel
            y = cache.attend(self.layer_idx, q)
        else:
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C).to(q.dtype)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.activation = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    activation_checkpointing = False  # True: training recomputes each block's activations in the backward

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size:].zero_()  # padding rows: never a token

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; tied weights once; without the position embedding by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, cache=None):
        """Final-LayerNorm activations (B, T, n_embd). With a KV cache (engine.KVCache), the
        cache says at which positions these tokens stand and which keys they attend to."""
        T = idx.shape[1]
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"{T} tokens exceed the model's block_size {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None
        else:
            positions, mask = cache.layout(T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            # checkpointed: the block keeps its input only, and runs again in the backward with the
            # random state it had (the same dropout masks), so the gradients are those of the plain run
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, cache, mask)
        return self.transformer.ln_f(x)

    def output_layer(self):
        """What the fused losses multiply by: the output weight, or a quantized output layer
        (quantize.py) itself, which computes its own logits."""
        return self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head

    def logits(self, x):
        """Output-layer logits over the real vocabulary (padding rows dropped)."""
        return self.lm_head(x)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, reduction="mean", supervised=None, fused=True):
        """logits, loss = model(idx, targets).

        Without targets: logits at every position (B, T, vocab_size), and loss None.
        With targets (B, T): the cross-entropy of the positions whose target is not negative,
        averaged (reduction='mean') or summed ('sum'). fused=True (training's path) runs the
        output layer only at those positions, fused with the loss (loss.py), and returns no
        logits; `supervised` may give those positions' flat indices, computed on the host.
        fused=False is the plain reference the fused path is tested against.
        """
        x = self.hidden_states(idx)
        if targets is None:
            return self.logits(x), None
        if fused:
            logits = None
            total = loss.supervised_cross_entropy(x, self.output_layer(), targets, self.config.vocab_size, supervised)
        else:
            logits = self.logits(x)
            total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="sum")
        if reduction == "mean":
            total = total / (targets >= 0).sum().clamp(min=1)  # no supervised token: loss 0, not NaN
        return logits, total

    # ------------------------------------------------------------------------- weights I/O

    @classmethod
    def from_pretrained(cls, folder, **overrides):
        """GPT-2 from a local folder holding config.json and model.safetensors (or shards, or
        pytorch_model.bin), as transformers' save_pretrained writes them. checkpoint.py turns
        names, hub ids and training runs into such folders. overrides: block_size (crop the
        context), dropout, and bias=False to reload a model trained without biases."""
        folder = Path(folder)
        config = config_from_hf(read_json(folder / "config.json", "model config"), where=str(folder / "config.json"))
        for key, value in overrides.items():
            if key not in ("block_size", "dropout", "bias"):
                raise GrafitoError(f"from_pretrained: cannot override {key!r} of a pretrained model")
            if key == "block_size" and value > config.block_size:
                raise GrafitoError(f"block_size {value} exceeds the {config.block_size} positions {folder} was trained with")
            setattr(config, key, value)
        config.check(where=str(folder))
        model = cls(config)
        model.load_hf_state_dict(read_weights(weight_files(folder)), source=str(folder))
        return model

    def load_hf_state_dict(self, state, source="checkpoint"):
        """Copy weights in Hugging Face GPT-2 layout (with or without the 'transformer.'
        prefix) into this model; a missing, misshapen or non-float tensor is one error naming it."""
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        tied_head = state.pop("lm_head.weight", None)
        if not self.config.bias:
            nonzero = [key for key in self._zero_bias_names() if key in state and state.pop(key).any()]
            if nonzero:
                raise GrafitoError(f"{source}: bias=False, but biases such as {nonzero[0]!r} are not zero; "
                                   f"load it without the bias override")
        problems, copies = [], []
        for name, param in self._hf_params():
            key = name.removeprefix("transformer.")
            tensor = state.pop(key, None)
            expected = _hf_shape(name, param, self.config)
            if tensor is None:
                problems.append(f"missing {key!r} (expected shape {tuple(expected)})")
                continue
            if not tensor.is_floating_point():
                problems.append(f"{key!r} holds {tensor.dtype} values, not floating-point weights")
                continue
            if tuple(tensor.shape) != tuple(expected):
                if key == "wpe.weight" and tensor.shape[0] > expected[0] and tensor.shape[1] == expected[1]:
                    tensor = tensor[:expected[0]]  # block_size below the trained context: crop
                else:
                    problems.append(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
                    continue
            copies.append((name, param, tensor))
        if problems:
            raise GrafitoError(f"{source}: weights do not fit this GPT-2 config: " + "; ".join(problems[:5])
                               + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        with torch.no_grad():
            for name, param, tensor in copies:
                tensor = tensor.t() if _is_conv1d(name) else tensor
                param[:tensor.shape[0]].copy_(tensor)  # wte fills the unpadded rows only
        real_rows = self.transformer.wte.weight[:self.config.vocab_size]
        if tied_head is not None and not torch.equal(tied_head, real_rows.to(tied_head.dtype)):
            raise GrafitoError(f"{source}: lm_head.weight differs from wte.weight; grafito needs GPT-2's tied output layer")
        buffers = [k for k in state if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", k)]
        unexpected = sorted(set(state) - set(buffers))
        if unexpected:
            warnings.warn(f"{source}: ignored {len(unexpected)} tensors that GPT-2 does not use: {unexpected[:5]}")

    def hf_state_dict(self):
        """Weights in Hugging Face GPT2LMHeadModel layout, loadable by transformers and by from_pretrained."""
        if any(getattr(module, "merged", True) is False for module in self.modules()):
            raise GrafitoError("this model has unmerged LoRA adapters; merge them (lora.merge_lora) "
                               "or save the adapter instead")
        state = {}
        for name, param in self._hf_params():
            tensor = param.detach()
            if name == "transformer.wte.weight":
                tensor = tensor[:self.config.vocab_size]
            state[name] = (tensor.t() if _is_conv1d(name) else tensor).contiguous().cpu()
        if not self.config.bias:  # export as GPT-2 with zero biases: same function, standard layout
            for key, size in self._zero_bias_names().items():
                state["transformer." + key] = torch.zeros(size, dtype=self.transformer.wte.weight.dtype)
        return state

    def _zero_bias_names(self):
        """{checkpoint key: size} of the biases GPT-2 has and a bias=False model leaves out."""
        return {name.removeprefix("transformer.").removesuffix("weight") + "bias": param.shape[0]
                for name, param in self._hf_params()
                if name.endswith("weight") and name.startswith(("transformer.h.", "transformer.ln_f"))}

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors in Hugging Face GPT-2 format."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(hf_config(self.config), indent=2) + "\n")
        save_file(self.hf_state_dict(), directory / "model.safetensors", metadata={"format": "pt"})

    def _hf_params(self):
        """(name, parameter) of every weight GPT-2 checkpoints hold; LoRA factors and the tied head excluded."""
        for name, param in self.named_parameters():
            if "lora_" not in name and name != "lm_head.weight":
                yield name, param


def _is_conv1d(name):
    """OpenAI's checkpoints store these linear weights as (in, out) 'Conv1D' matrices."""
    return name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def _hf_shape(name, param, config):
    if name == "transformer.wte.weight":
        return (config.vocab_size, config.n_embd)
    return tuple(reversed(param.shape)) if _is_conv1d(name) else tuple(param.shape)


def hf_config(config):
    """The config.json transformers writes for GPT-2, from a GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_epsilon, "activation_function": config.activation,
        "n_inner": config.n_inner, "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
        "attn_pdrop": config.dropout, "embd_pdrop": config.dropout, "resid_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def config_from_hf(hf, where="config.json"):
    """GPTConfig from a Hugging Face GPT-2 config.json; anything grafito cannot run exactly is an error."""
    if not isinstance(hf, dict):
        raise GrafitoError(f"{where}: expected a JSON object of GPT-2 settings, found {type(hf).__name__}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GrafitoError(f"{where}: model_type is {hf['model_type']!r}; grafito loads GPT-2 (model_type 'gpt2') only")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise GrafitoError(f"{where}: missing {', '.join(missing)}; is this a GPT-2 config.json?")
    unsupported = []
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        unsupported.append("scale_attn_by_inverse_layer_idx/scale_attn_weights (non-standard attention scaling)")
    if hf.get("reorder_and_upcast_attn"):
        unsupported.append("reorder_and_upcast_attn")
    if hf.get("add_cross_attention"):
        unsupported.append("add_cross_attention")
    if hf.get("tie_word_embeddings", True) is False:
        unsupported.append("tie_word_embeddings=false (untied output embeddings)")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        unsupported.append(f"activation_function={activation!r} (grafito runs {', '.join(ACTIVATIONS)})")
    if unsupported:
        raise GrafitoError(f"{where}: unsupported GPT-2 variant: {'; '.join(unsupported)}")
    values = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                  vocab_size=hf["vocab_size"], n_inner=hf.get("n_inner"), activation=activation,
                  layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0, bias=True, vocab_multiple=64)
    check_config_values(values, where, names={"block_size": "n_positions", "activation": "activation_function"})
    if values["n_inner"] == 4 * values["n_embd"]:
        values["n_inner"] = None  # GPT-2's default, however the file spells it
    return GPTConfig(**values)


def read_json(path, what):
    """A JSON file's value, or one error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GrafitoError(f"{Path(path).parent} has no {Path(path).name}: a {what} folder holds config.json and "
                           f"model.safetensors (or pytorch_model.bin)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GrafitoError(f"{path}: not a readable JSON file ({type(err).__name__}: {err})") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def weight_files(folder):
    """The weight files from_pretrained reads in a folder: the first format present, shards listed by its index."""
    folder = Path(folder)
    for filename in WEIGHT_FILES:
        if (folder / filename).is_file():
            return [folder / shard for shard in shard_names(folder / filename)]
    raise GrafitoError(f"{folder} has config.json but no weights ({', '.join(WEIGHT_FILES)})")


def shard_names(path):
    """[path.name], or the shard files a model.safetensors.index.json lists."""
    path = Path(path)
    if not path.name.endswith(".index.json"):
        return [path.name]
    index = read_json(path, "weights index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise GrafitoError(f"{path}: expected a 'weight_map' object naming shard files")
    return sorted(set(weight_map.values()))


def read_weights(files):
    """One state dict from safetensors or PyTorch files (PyTorch ones with weights_only=True)."""
    from safetensors.torch import load_file

    state = {}
    for path in files:
        try:
            loaded = load_file(path) if str(path).endswith(".safetensors") else torch.load(
                path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise GrafitoError(f"could not read weights from {path}: {type(err).__name__}: {err}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise GrafitoError(f"{path}: not a state dict of tensors")
        state.update(loaded)
    return state
