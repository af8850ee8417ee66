"""Int8 weights for generation and evaluation on a CPU (sample.py, serve.py, eval.py --quantize=int8).

Every linear layer, the tied output layer included, keeps its weight as int8 with one scale
per output row (the row's largest |weight| / 127, stored in the model's dtype) and multiplies
through PyTorch's int8 weight-only kernel (torch._weight_int8pack_mm): a decode step then
reads half the bytes of bf16 (whether it is faster then depends on how fast the CPU runs
that kernel: docs/performance.md). Activations stay in the model's dtype. The token embedding
stays as it was (a lookup reads one row). Nothing here trains: the weights are buffers.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import GrafitoError
from configurator import check_options, one_of

CHOICES = ("", "int8")  # --quantize: '' keeps the weights in --dtype
RULES = {"quantize": one_of(*CHOICES)}


def check(method, device, compile=False):
    """Whether --quantize=method can run on device (resolved: cpu, cuda:0, ...): one clear error if not."""
    check_options({"quantize": method}, RULES)
    if method and not device.startswith("cpu"):
        raise GrafitoError(f"--quantize={method} runs on CPUs only (PyTorch's int8 weight-only kernel there); "
                           f"add --device=cpu, or leave --quantize out on {device}")
    if method and compile:
        raise GrafitoError(f"--quantize={method} runs eagerly: leave out --compile")


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output row; bias kept as is."""

    def __init__(self, linear, scale_dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        largest = weight.abs().amax(dim=1)
        scales = torch.where(largest > 0, largest / 127, 1.0).to(scale_dtype)  # an all-zero row (padding) stays 0
        rounded = torch.round(weight / scales.float()[:, None]).clamp(-127, 127)  # the stored scale, not the exact one
        self.register_buffer("weight_int8", rounded.to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = self.in_features % 8 == 0  # the kernel reads whole groups of 8 inputs (others crash it)

    @property
    def weight(self):
        """The dequantized weight (what the fused loss and many-row products use)."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            raise GrafitoError("int8 weights are for generation and evaluation: they cannot be trained")
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, scales = x.to(dtype), self.scales.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        rows = x.numel() // x.shape[-1]
        # the kernel for every row count, though a GEMM over dequantized weights is faster for
        # hundreds of rows: it rounds differently, so a prompt's keys would depend on its batch
        if not self.kernel:
            return F.linear(x, self.weight_int8.to(dtype) * scales[:, None], bias)
        y = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.weight_int8, scales)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, scales {self.scales.dtype}"


def quantize(model, method, dtype):
    """The model (a GPT, in eval mode) with its linear layers replaced as `method` says ('' does
    nothing); scales are stored in dtype, the dtype it will run in."""
    if not method:
        return model
    if model.training:
        raise GrafitoError("int8 weights are for generation and evaluation: put the model in eval mode first")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child, dtype))
    return model
