"""LoRA (Hu et al., 2021, arXiv:2106.09685) for grafito's GPT-2, written from the paper.

A LoRALinear keeps its nn.Linear weight frozen and adds scale * B @ A, with A (r x in,
Kaiming-uniform) and B (out x r, zeros), so a fresh adapter leaves the model unchanged.
GPT-2 computes q, k and v with one fused c_attn matrix; the paper adapts W_q and W_v, so
each chosen third of c_attn's output gets its own A and B (targets 'q', 'v', optionally 'k').
Adapters compute in float32, outside autocast, and keep float32 parameters whatever
dtype the frozen base uses.
"""

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import GrafitoError

# target name -> (linear layer inside each Block, which third of c_attn's output or None for all)
TARGETS = {
    "q": ("attn.c_attn", 0),
    "k": ("attn.c_attn", 1),
    "v": ("attn.c_attn", 2),
    "attn_proj": ("attn.c_proj", None),
    "mlp_fc": ("mlp.c_fc", None),
    "mlp_proj": ("mlp.c_proj", None),
}
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = ("q", "v")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise GrafitoError(f"lora targets {list(self.targets)}: choose from {', '.join(TARGETS)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise GrafitoError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GrafitoError(f"lora dropout must be in [0, 1), got {self.dropout}")


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen weight plus a low-rank update on some of its output chunks.

    The output is split into `chunks` equal parts; `adapted` lists the parts that get an
    adapter (for c_attn: chunks=3, adapted=(0, 2) is q and v). Parameter names stay those
    of the wrapped layer (weight, bias) plus lora_A (k, r, in) and lora_B (k, out/chunks, r).
    """

    def __init__(self, base, r, alpha, dropout, chunks=1, adapted=(0,)):
        nn.Module.__init__(self)  # reuse the base layer's tensors rather than allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scale, self.chunks = r, alpha / r, chunks
        self.register_buffer("adapted", torch.tensor(adapted, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(len(adapted), r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(len(adapted), self.out_features // chunks, r, device=device))
        for a in self.lora_A.data:  # per adapter: fan_in is in_features, as for nn.Linear's weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.active = True  # False: the frozen layer alone (adapters_off)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.active:
            return y
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.lora_dropout(x).float()
            down = torch.einsum("...i,kri->...kr", h, self.lora_A.float())
            delta = torch.einsum("...kr,kor->...ko", down, self.lora_B.float()) * self.scale
        if self.chunks == 1:
            return y + delta.squeeze(-2).to(y.dtype)
        y = y.view(*y.shape[:-1], self.chunks, -1).index_add(-2, self.adapted, delta.to(y.dtype))
        return y.flatten(-2)

    def delta_weight(self):
        """scale * B @ A laid out as the (out, in) weight it adds to."""
        update = torch.einsum("kor,kri->koi", self.lora_B.float(), self.lora_A.float()) * self.scale
        full = update.new_zeros(self.chunks, self.out_features // self.chunks, self.in_features)
        full[self.adapted] = update
        return full.view(self.out_features, self.in_features)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale}, adapted={self.adapted.tolist()}/{self.chunks}"


def apply_lora(model, lora_config):
    """Freeze every weight of a GPT and add adapters on lora_config.targets; returns the model."""
    model.requires_grad_(False)
    layers = {}
    for target in lora_config.targets:
        path, third = TARGETS[target]
        layers.setdefault(path, []).append(third)
    for block in model.transformer.h:
        for path, thirds in layers.items():
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, child_name)
            if isinstance(base, LoRALinear):
                raise GrafitoError("this model already has LoRA adapters")
            chunks, adapted = (3, tuple(sorted(thirds))) if thirds[0] is not None else (1, (0,))
            setattr(parent, child_name, LoRALinear(base, lora_config.r, lora_config.alpha,
                                                   lora_config.dropout, chunks, adapted))
    model.lora_config = lora_config
    return model


def cast_frozen_linears(model, dtype):
    """Store the frozen block matrices (and their biases) in the autocast dtype.

    Autocast rounds them to that dtype for every matmul anyway, so the results are the same;
    what goes away is a cast of every weight at every step, and half their memory.
    Embeddings and LayerNorms keep float32 (the residual stream stays float32).
    """
    for module in model.transformer.h.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model):
    """The model without its adapters, for the duration: the base it adapts, computed by the
    same frozen matrices (DPO's reference model, without a second copy in memory)."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers):
        raise GrafitoError("adapters merged into their base cannot be switched off; unmerge them first")
    for layer in layers:
        layer.active = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.active = True


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def fold_lora(model):
    """Merge every adapter and put back plain, trainable nn.Linear layers: a GPT as if
    fully fine-tuned, ready for inference, export or a new adapter on top. Frozen matrices
    kept in bf16 (cast_frozen_linears) go back to float32 first, so the merge is exact."""
    cast_frozen_linears(model, torch.float32)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for child_name, layer in list(parent.named_children()):
                if isinstance(layer, LoRALinear):
                    layer.merge()
                    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      device="meta")
                    plain.weight, plain.bias = layer.weight, layer.bias
                    setattr(parent, child_name, plain)
    model.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()


def lora_state_dict(model):
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if "lora_" in name}


def save_adapter(model, directory, base_model, base_config, base_fingerprint=None):
    """Write adapter.safetensors (the LoRA factors only) and adapter_config.json.

    base_model names the weights the adapter was trained on (a GPT-2 name, hub repo id or
    folder); base_config is its GPTConfig as a dict, checked when the adapter is loaded, as is
    base_fingerprint (checkpoint.weights_fingerprint of a local base folder) by the loader.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "grafito-lora-1", **asdict(model.lora_config), "base_model": str(base_model),
            "base_config": base_config, "base_fingerprint": base_fingerprint}
    meta["targets"] = list(meta["targets"])
    save_file(lora_state_dict(model), directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_adapter_config(directory):
    path = Path(directory) / ADAPTER_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GrafitoError(f"cannot read LoRA adapter config {path}: {err}") from None
    if meta.get("format") != "grafito-lora-1":
        raise GrafitoError(f"{path}: not a grafito LoRA adapter (format {meta.get('format')!r})")
    missing = [key for key in ("r", "alpha", "dropout", "targets", "base_model") if key not in meta]
    if missing:
        raise GrafitoError(f"{path}: adapter config lacks {', '.join(missing)}; save it again with lora.save_adapter")
    return meta


def load_adapter(model, directory):
    """Add the adapter saved in `directory` to a base GPT (applying LoRA first if needed)."""
    from safetensors.torch import load_file

    meta = read_adapter_config(directory)
    base_config = meta.get("base_config") or {}
    differs = [f"{key} {base_config[key]} vs {getattr(model.config, key)}" for key in ("n_layer", "n_head", "n_embd", "vocab_size")
               if key in base_config and base_config[key] != getattr(model.config, key)]
    if differs:
        raise GrafitoError(f"{directory}: adapter was trained on a different base ({meta['base_model']}): "
                           f"{', '.join(differs)} (adapter's base vs this model)")
    lora_config = LoRAConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], targets=meta["targets"])
    if not lora_layers(model):
        apply_lora(model, lora_config)
    elif model.lora_config != lora_config:
        raise GrafitoError(f"{directory}: adapter settings {lora_config} differ from the model's {model.lora_config}")
    weights = Path(directory) / ADAPTER_WEIGHTS
    try:
        state = load_file(weights)
    except Exception as err:  # missing, truncated or not safetensors
        raise GrafitoError(f"cannot read LoRA adapter weights {weights}: {type(err).__name__}: {err}") from None
    params = dict((n, p) for n, p in model.named_parameters() if "lora_" in n)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in params
             if n in state and state[n].shape != params[n].shape]
    if missing or unexpected or wrong:
        raise GrafitoError(f"{directory}: adapter does not fit this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
    return model
