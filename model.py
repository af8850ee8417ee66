"""GPT-2 in one file: the network, a KV cache and sampling for generation, and loading
OpenAI's weights from the Hugging Face hub or a local folder exactly.

Numerics follow OpenAI's GPT-2 as implemented by Hugging Face transformers: GELU with the
tanh approximation, LayerNorm eps from the config (1e-5), tied token embedding and output
weights, attention through scaled_dot_product_attention (flash kernels on GPU).
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

from common import GrafitoError

PRESETS = {  # OpenAI's four sizes; all use block_size 1024 and the 50257-token BPE
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
HUB_REPOS = {name: f"openai-community/{name}" for name in PRESETS}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases; False only for models trained from scratch
    layer_norm_epsilon: float = 1e-5
    vocab_multiple: int = 64  # embedding rows padded to a multiple of this (faster GPU matmuls)

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise GrafitoError(f"GPTConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.n_embd % self.n_head:
            raise GrafitoError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise GrafitoError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise GrafitoError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- the network

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx

    def forward(self, x, cache=None, attn_mask=None, is_causal=True):
        B, T, C = x.shape
        q, k, v = linear(self.c_attn, x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        if _explicit_attention_is_faster(q, cache, attn_mask, is_causal):
            y = _causal_attention(q, k, v, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(linear(self.c_proj, y))


def linear(layer, x):
    """layer(x), but a single half-precision row on the CPU (one-token decoding at batch 1) goes
    through torch.mv: for one row oneDNN's bf16 GEMM streams the weights slower than the
    matrix-vector kernel (124M on 2 cores: the lm_head 7.2 -> 5.0 ms; a whole decode step
    28-31 -> 21-27 ms in back-to-back runs, same tokens). Eager inference only: training,
    autocast and torch.compile (which packs the weights itself) keep layer(x)."""
    if (x.device.type == "cpu" and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and type(layer) is nn.Linear and layer.weight.dtype == x.dtype and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        y = torch.mv(layer.weight, x.reshape(-1))
        y = y if layer.bias is None else y + layer.bias
        return y.view(*x.shape[:-1], y.shape[0])
    return layer(x)


def _explicit_attention_is_faster(q, cache, attn_mask, is_causal):
    """PyTorch's CPU flash-attention kernel is slower than plain matmuls + softmax for the
    short sequences of CPU training (forward + backward of one 4x12x256x64 bf16 layer on a
    2-core AVX-512 CPU: 24 ms against 14 ms); the explicit path keeps B*H*T*T scores for the
    backward, so it is used only while those stay small. GPUs always take SDPA's kernels."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and torch.is_grad_enabled() and cache is None and attn_mask is None
            and is_causal and B * H * T * T <= 2 ** 25)


def _causal_attention(q, k, v, dropout):
    """softmax(q k^T / sqrt(d) + causal mask) v, as scaled_dot_product_attention computes it."""
    T = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return F.dropout(weights, dropout) @ v if dropout else weights @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(linear(self.c_proj, F.gelu(linear(self.c_fc, x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, attn_mask=None, is_causal=True):
        x = x + self.attn(self.ln_1(x), cache, attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
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
        self._compiled_decode = None
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

    def hidden_states(self, idx, cache=None, shared_grad=None):
        """Final-LayerNorm activations (B, T, n_embd); with a cache, idx continues the cached tokens."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed the model's block_size {self.config.block_size}")
        if cache is None:
            positions, attn_mask, is_causal = torch.arange(T, device=idx.device), None, True
        else:
            positions = cache.positions(T)
            attn_mask, is_causal = cache.attention(T)
        tokens = (self.transformer.wte(idx) if shared_grad is None
                  else _TiedEmbedding.apply(idx, self.transformer.wte.weight, shared_grad))
        x = self.transformer.drop(tokens + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, cache, attn_mask, is_causal)
        if cache is not None:
            cache.advance(positions)
        return self.transformer.ln_f(x)

    def decode_step(self, token, cache):
        """Logits (B, vocab) of the next token after one new token per row, through the cache."""
        if cache.length >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions)")
        slot = torch.full((1,), cache.length, dtype=torch.long, device=cache.device)
        cache.key_valid[:, cache.length] = True
        if self._compiled_decode is None:
            logits = self._decode_one(token, slot, cache.next_position, cache.keys, cache.values, cache.key_valid)
        else:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):  # read when (re)compiling, which happens inside the call
                logits = self._compiled_decode(token, slot, cache.next_position, cache.keys, cache.values,
                                               cache.key_valid)
        cache.length += 1
        cache.next_position += 1
        return logits

    def _decode_one(self, token, slot, position, keys, values, key_valid):
        writer = _SlotWriter(keys, values, slot)
        x = self.transformer.wte(token[:, None]) + self.transformer.wpe(position[:, None])
        mask = key_valid[:, None, None, :]
        for block in self.transformer.h:
            x = block(x, writer, mask, False)
        return linear(self.lm_head, self.transformer.ln_f(x)[:, -1])[:, :self.config.vocab_size]

    def compile_decode(self):
        """torch.compile the one-token decode step for inference: fixed shapes (the cache
        length is rounded up to a multiple of 256, so one graph serves many prompts) and
        frozen weights, which lets the CPU backend pre-pack them for its matmul kernels.
        Call it after the model has its final device and dtype; it is not for training."""
        self._compiled_decode = torch.compile(self._decode_one, dynamic=False)
        return self

    def forward(self, idx, targets=None, loss_reduction="mean"):
        """logits, loss = model(idx, targets).

        Without targets: logits at every position, (B, T, vocab_size), and loss None.
        With targets (B, T): positions whose target is -1 (any negative) are ignored; loss is
        the cross-entropy of the others, averaged (loss_reduction='mean') or summed ('sum').
        The output layer then runs only at those positions and fused with the loss, chunk by
        chunk, so the logits are never materialised and None is returned in their place.
        """
        if targets is None:
            return self.lm_head(self.hidden_states(idx))[..., :self.config.vocab_size], None
        # The tied embedding/output weight gets one gradient buffer, handed from one backward to
        # the other through a Python object; torch.compile does not keep that hand-over, so a
        # compiled model takes PyTorch's own (slower, equally exact) sum of the two gradients.
        shared_grad = None if torch.compiler.is_compiling() else TiedGradient()
        x = self.hidden_states(idx, shared_grad=shared_grad)
        supervised = targets >= 0
        loss = linear_cross_entropy(x[supervised], self.lm_head.weight, targets[supervised], self.config.vocab_size,
                                    shared_grad=shared_grad)
        if loss_reduction == "mean":
            loss = loss / supervised.sum().clamp(min=1)  # no supervised token: loss 0, not NaN
        return None, loss

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, **options):
        """nanoGPT's generate with a KV cache: idx (B, T) with up to max_new_tokens appended.

        temperature=0 is greedy. Options: top_p, repetition_penalty, stop_ids (a row that
        produces one stops; it is padded with that id until every row has stopped),
        prompt_mask (B, T) for left-padded prompts of different lengths, generator, and
        vocab_limit: draw only among the first vocab_limit ids (the tokenizer's; some hub
        fine-tunes, e.g. dlite's 50,260 rows, have more rows than GPT-2 has tokens).
        When the context fills, the cache restarts from the most recent tokens (at least half
        the context). In a left-padded batch that happens when the longest row fills it, so a
        shorter row may restart earlier than it would alone, and its later tokens can differ
        from decoding it alone; within the context window, batched rows equal single rows.
        """
        new_tokens = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, **options))
        return torch.cat([idx] + [t[:, None] for t in new_tokens], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, stop_ids=(), prompt_mask=None, generator=None, vocab_limit=None):
        """Yield the next token of every row, (B,), one step at a time (see generate)."""
        was_training = self.training
        self.eval()
        try:
            yield from self._decode(idx, max_new_tokens, temperature, top_k, top_p,
                                    repetition_penalty, stop_ids, prompt_mask, generator, vocab_limit)
        finally:
            self.train(was_training)

    def _decode(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                stop_ids, prompt_mask, generator, vocab_limit):
        block_size, (B, T) = self.config.block_size, idx.shape
        if T > block_size:  # keep the most recent context, as nanoGPT does
            idx, T = idx[:, -block_size:], block_size
            prompt_mask = None if prompt_mask is None else prompt_mask[:, -block_size:]
        # every token so far, for the penalty and for restarting the cache when the context fills
        tokens = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
        real = torch.ones_like(tokens, dtype=torch.bool)
        if prompt_mask is not None:
            real[:, :T] = prompt_mask
        seen = None
        if repetition_penalty != 1.0:
            counts = torch.zeros(B, self.config.vocab_size, device=idx.device)
            seen = counts.scatter_add_(1, idx, real[:, :T].float()) > 0  # padding is not "seen"
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        dtype = self._compute_dtype(idx.device)
        cache = KVCache(self.config, B, self._cache_length(T + max_new_tokens), idx.device, dtype, prompt_mask)
        logits = self._last_logits(idx, cache)
        for step in range(max_new_tokens):
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[:, vocab_limit:] = float("-inf")
            token = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
            if len(stop):
                token = torch.where(finished, stop[0], token)
                finished |= torch.isin(token, stop)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            tokens[:, T + step] = token
            yield token
            remaining = max_new_tokens - step - 1
            if remaining == 0 or (len(stop) and bool(finished.all())):
                return
            if cache.length == cache.max_len:  # context full: restart from the most recent tokens
                keep = max(block_size // 2, block_size - remaining)
                upto = T + step + 1
                window, window_mask = left_pad([row[ok][-keep:] for row, ok in zip(tokens[:, :upto], real[:, :upto])], 0)
                cache = KVCache(self.config, B, self._cache_length(window.shape[1] + remaining), idx.device, dtype,
                                window_mask)
                logits = self._last_logits(window, cache)
            else:
                logits = self.decode_step(token, cache)

    def _last_logits(self, idx, cache):
        return linear(self.lm_head, self.hidden_states(idx, cache)[:, -1])[:, :self.config.vocab_size]

    def _cache_length(self, tokens):
        if self._compiled_decode is not None:  # few distinct shapes, few compilations
            tokens = math.ceil(tokens / 256) * 256
        return min(tokens, self.config.block_size)

    def _compute_dtype(self, device):
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.transformer.wte.weight.dtype

    # ------------------------------------------------------------------------- weights I/O

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 from a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a hub repo id of
        GPT-2 architecture, or a local folder with config.json and model.safetensors
        (or pytorch_model.bin). overrides: block_size (crop the context), dropout, and
        bias=False to reload a model trained without biases (saved with zero biases)."""
        source = PretrainedSource(name_or_path)
        config_file = source.config_file()
        config = config_from_hf(json.loads(config_file.read_text()), where=str(config_file))
        for key, value in overrides.items():
            if key not in ("block_size", "dropout", "vocab_multiple", "bias"):
                raise GrafitoError(f"from_pretrained: cannot override {key!r} of a pretrained model")
            if key == "block_size" and value > config.block_size:
                raise GrafitoError(f"block_size {value} exceeds the {config.block_size} positions "
                                   f"{name_or_path} was trained with")
            setattr(config, key, value)
        config.__post_init__()
        model = cls(config)
        model.load_hf_state_dict(read_weights(source.weight_files()), source=str(name_or_path))
        return model

    def load_hf_state_dict(self, state, source="checkpoint"):
        """Copy weights in Hugging Face GPT-2 layout (with or without the 'transformer.'
        prefix) into this model; a missing or misshapen tensor is one error naming it."""
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
            elif tuple(tensor.shape) != tuple(expected):
                if key == "wpe.weight" and tensor.shape[0] > expected[0] and tensor.shape[1] == expected[1]:
                    tensor = tensor[:expected[0]]  # block_size below the trained context: crop
                else:
                    problems.append(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
                    continue
            if tensor is not None:
                copies.append((name, param, tensor))
        if problems:
            raise GrafitoError(f"{source}: weights do not fit this GPT-2 config: " + "; ".join(problems[:5])
                               + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        with torch.no_grad():
            for name, param, tensor in copies:
                tensor = tensor.t() if _is_conv1d(name) else tensor
                param[:tensor.shape[0]].copy_(tensor)  # wte fills the unpadded rows only
        if tied_head is not None and not torch.equal(tied_head, self.transformer.wte.weight[:self.config.vocab_size].to(tied_head.dtype)):
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
        "layer_norm_epsilon": config.layer_norm_epsilon, "activation_function": "gelu_new",
        "n_inner": None, "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
        "attn_pdrop": config.dropout, "embd_pdrop": config.dropout, "resid_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def config_from_hf(hf, where="config.json"):
    """GPTConfig from a Hugging Face GPT-2 config.json; anything GPT-2-incompatible is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GrafitoError(f"{where}: model_type is {hf['model_type']!r}; grafito loads GPT-2 (model_type 'gpt2') only")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise GrafitoError(f"{where}: missing {', '.join(missing)}; is this a GPT-2 config.json?")
    unsupported = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        unsupported.append(f"n_inner={hf['n_inner']}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        unsupported.append("non-standard attention scaling")
    if hf.get("add_cross_attention"):
        unsupported.append("cross-attention")
    if hf.get("tie_word_embeddings", True) is False:
        unsupported.append("untied output embeddings")
    if unsupported:
        raise GrafitoError(f"{where}: unsupported GPT-2 variant ({', '.join(unsupported)})")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class PretrainedSource:
    """Where pretrained GPT-2 files come from: a local folder or a hub repository.

    config.json is fetched (and checked) before the weights, so a wrong model fails before
    a multi-GB download.
    """

    def __init__(self, name_or_path):
        self.name = str(name_or_path)
        path = Path(self.name).expanduser()
        self.folder = path if path.is_dir() else None
        self.repo_id = HUB_REPOS.get(self.name)
        if self.folder is None and self.repo_id is None:
            if re.fullmatch(r"[\w.-]+/[\w.-]+", self.name) and not self.name.startswith((".", "/", "~")):
                self.repo_id = self.name
            else:
                raise GrafitoError(f"{self.name!r}: no such model folder, and not a GPT-2 name "
                                   f"({', '.join(PRESETS)}) or a hub repo id (owner/name)")
        self.hint = ("Pass a local folder instead (init_from=path/to/dir) holding config.json and "
                     "model.safetensors, e.g. one written by GPT2LMHeadModel.save_pretrained, or retry "
                     "online (unset HF_HUB_OFFLINE).")
        if self.repo_id == self.name:
            self.hint = f"No local folder {self.name!r} exists either. " + self.hint

    def config_file(self):
        if self.folder is None:
            import hub

            return hub.download(self.repo_id, "config.json", local_hint=self.hint)
        config = self.folder / "config.json"
        if not config.is_file():
            raise GrafitoError(f"{self.folder} has no config.json: a model folder holds config.json and "
                               f"model.safetensors (or pytorch_model.bin)")
        return config

    def weight_files(self):
        if self.folder is not None:
            for filename in WEIGHT_FILES:
                if (self.folder / filename).is_file():
                    return self._with_shards(self.folder / filename, lambda shard: self.folder / shard)
            raise GrafitoError(f"{self.folder} has config.json but no weights ({', '.join(WEIGHT_FILES)})")
        import hub

        fetch = lambda filename: hub.download(self.repo_id, filename, local_hint=self.hint)
        unavailable = None
        for filename in WEIGHT_FILES:
            try:
                return self._with_shards(fetch(filename), fetch)
            except hub.HubFileMissing:
                continue
            except hub.HubUnavailable as err:  # offline: another format may still be cached
                unavailable = err
        raise unavailable or GrafitoError(f"hub repo {self.repo_id!r} holds none of {', '.join(WEIGHT_FILES)}")

    @staticmethod
    def _with_shards(path, fetch):
        if not path.name.endswith(".index.json"):
            return [path]
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return [fetch(shard) for shard in shards]


def read_weights(files):
    """One state dict from safetensors or PyTorch files (PyTorch ones with weights_only=True)."""
    from safetensors.torch import load_file

    state = {}
    for path in files:
        try:
            if str(path).endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            raise GrafitoError(f"could not read weights from {path}: {type(err).__name__}: {err}") from None
    return state


# ----------------------------------------------------------------------------- fused output layer + loss

def linear_cross_entropy(h, weight, targets, vocab_size, chunk_rows=1024, shared_grad=None):
    """Summed cross-entropy of h @ weight[:vocab_size].T against targets, in row chunks.

    Equal to F.cross_entropy(F.linear(h, weight)[:, :vocab_size], targets, reduction='sum'),
    gradients included, but each chunk's softmax becomes its gradient on the spot, so no
    (N x vocab) float32 logits, log-softmax or its backward are kept for autograd. Matmuls
    run in the autocast dtype when autocast is on; the softmax and the loss in float32.
    With shared_grad (a TiedGradient), the weight's gradient is handed to the tied token
    embedding instead, which adds its own part to the same buffer. One backward only.
    """
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_rows, compute_dtype, shared_grad)


class TiedGradient:
    """One float32 gradient buffer for GPT-2's tied embedding/output weight.

    The output layer's backward (which autograd runs first) leaves its gradient here; the
    embedding's backward adds the lookups' gradient into it and returns the sum. PyTorch's
    own way allocates, zero-fills and then adds a second vocab x n_embd buffer every step.
    """

    def __init__(self):
        self.grad = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, compute_dtype, shared_grad):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight[:vocab_size].to(compute_dtype)
            hc = h.to(compute_dtype)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            if need_w and h.shape[0] == 0:
                grad_w.zero_()  # no supervised row: no chunk will write it
            elif need_w:
                grad_w[vocab_size:].zero_()  # padding rows; the others are written by the first chunk
            for start in range(0, h.shape[0], chunk_rows):
                rows, t = hc[start:start + chunk_rows], targets[start:start + chunk_rows]
                logits = rows @ w.t()
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                # log-sum-exp, exactly, from the largest logit and its probability (never below 1/vocab)
                top, top_index = logits.max(dim=-1, keepdim=True)
                lse = top.float() - probs.gather(1, top_index).log()
                loss += (lse - logits.gather(1, t[:, None]).float()).sum()
                if need_h or need_w:
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
                    g = probs.to(compute_dtype)
                    if need_h:
                        grad_h[start:start + chunk_rows] = g @ w
                    if need_w and start == 0:
                        grad_w[:vocab_size] = g.t() @ rows
                    elif need_w:
                        grad_w[:vocab_size] += g.t() @ rows
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.shared_grad = weight.dtype, shared_grad
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # made for this one backward: scaled in place
        grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        if grad_w is not None:
            grad_w.mul_(grad_loss)
            if ctx.shared_grad is not None:
                ctx.shared_grad.grad, grad_w = grad_w, None
            else:
                grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


class _TiedEmbedding(torch.autograd.Function):
    """Token embedding lookup whose weight gradient goes into the output layer's buffer."""

    @staticmethod
    def forward(ctx, idx, weight, shared_grad):
        ctx.save_for_backward(idx)
        ctx.weight_shape, ctx.weight_dtype, ctx.shared_grad = weight.shape, weight.dtype, shared_grad
        return F.embedding(idx, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        grad = ctx.shared_grad.grad
        if grad is None:  # the output layer had no gradient to share
            grad = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=grad_out.device)
        grad.index_add_(0, idx.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]).to(grad.dtype))
        ctx.shared_grad.grad = None
        return None, grad.to(ctx.weight_dtype), None


# ----------------------------------------------------------------------------- KV cache and sampling

class KVCache:
    """Keys and values of every layer, preallocated for max_len positions.

    Filled two ways: a prefill of any number of tokens through hidden_states() (attention
    over the filled part), then one token per row at a time through GPT.decode_step()
    (attention over the whole buffer, unwritten slots masked: fixed shapes, so the step
    compiles to one graph). prompt_mask (B, T), True on real tokens, describes left-padded
    prompts of different lengths: padding is never attended to and positions count from
    each row's first real token.
    """

    def __init__(self, config, batch_size, max_len, device, dtype, prompt_mask=None):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len, self.device, self.length = max_len, device, 0
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.prompt_mask = None
        if prompt_mask is not None and not bool(prompt_mask.all()):
            if bool((prompt_mask[:, 1:] < prompt_mask[:, :-1]).any()):
                raise ValueError("prompt_mask must describe left padding: zeros, then ones, in every row")
            self.prompt_mask = prompt_mask
        self.pad_count = None if self.prompt_mask is None else (~self.prompt_mask).sum(dim=1)
        self.next_position = None  # (B,) position of each row's next token, once prefilled

    def update(self, layer, k, v):
        """Prefill: store k, v (B, H, T, D) after the cached positions; return the filled part."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def positions(self, T):
        positions = torch.arange(self.length, self.length + T, device=self.device)
        if self.pad_count is None:
            return positions
        return (positions[None, :] - self.pad_count[:, None]).clamp(min=0)

    def attention(self, T):
        """(attn_mask, is_causal) for T new queries after the cached ones."""
        if self.prompt_mask is None:
            if T == 1:
                return None, False  # one new token sees every cached key
            if self.length == 0:
                return None, True  # plain causal prefill: the fast kernels apply
        query_pos = torch.arange(self.length, self.length + T, device=self.device)[:, None]
        key_pos = torch.arange(self.length + T, device=self.device)[None, :]
        mask = key_pos <= query_pos
        if self.prompt_mask is not None:
            valid = torch.ones(self.key_valid.shape[0], self.length + T, dtype=torch.bool, device=self.device)
            valid[:, :self.prompt_mask.shape[1]] = self.prompt_mask
            # a padding query sees only itself, so its softmax never has an empty row (NaN)
            mask = (mask & valid[:, None, None, :]) | (key_pos == query_pos)
        return mask, False

    def advance(self, positions):
        """Book-keeping after a prefill that ended at `positions` (T,) or (B, T)."""
        T = positions.shape[-1]
        self.key_valid[:, self.length:self.length + T] = True
        if self.prompt_mask is not None and self.length == 0:
            self.key_valid[:, :self.prompt_mask.shape[1]] = self.prompt_mask
        last = positions[..., -1]
        self.next_position = (last + 1).expand(self.key_valid.shape[0]).clone() if last.dim() == 0 else last + 1
        self.length += T


class _SlotWriter:
    """The cache as a decode step sees it: writes one position (a tensor index) and hands
    every layer's whole buffers to attention, so shapes never change between steps."""

    def __init__(self, keys, values, slot):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, layer, k, v):
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]


def left_pad(sequences, pad_id):
    """Token lists or 1-D tensors of different lengths -> (idx (B, T), prompt_mask (B, T))."""
    sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    width = max(len(s) for s in sequences)
    device = sequences[0].device
    idx = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool, device=device)
    for i, s in enumerate(sequences):
        if len(s):
            idx[i, width - len(s):] = s
            mask[i, width - len(s):] = True
    return idx, mask


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                seen=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V)."""
    logits = logits.float()
    if seen is not None and repetition_penalty != 1.0:  # CTRL-style: push seen tokens down
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # smallest nucleus
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- FLOPs

def training_flops(config, n_tokens, n_supervised, seq_len, lora=False):
    """Matmul FLOPs of a forward+backward over n_tokens, logits at n_supervised positions.

    Counts what grafito computes: the output layer only where the loss is taken, and with
    LoRA no weight gradients for the frozen matrices (their backward is one matmul, not two).
    Attention scores count all seq_len keys (PaLM's convention); LoRA's own tiny matmuls are left out.
    """
    C, L = config.n_embd, config.n_layer
    weight_pass = 4 if lora else 6  # forward 2 + input grads 2 (+ weight grads 2 when trained)
    body = weight_pass * 12 * L * C * C * n_tokens
    attention = 12 * L * C * seq_len * n_tokens
    head = weight_pass * C * config.vocab_size * n_supervised
    return body + attention + head
