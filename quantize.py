"""8-bit weights for generation and evaluation on a CPU (sample.py, serve.py, eval.py --quantize=...).

Every linear layer, the tied output layer included, keeps its weight as int8 with one scale
per output row (the row's largest |weight| / 127, stored in the model's dtype); a decode step
then reads half the bytes of bf16. Two ways to multiply (docs/performance.md):
- int8: weight-only. Activations stay in the model's dtype; PyTorch's own int8 weight-only
  kernel (torch._weight_int8pack_mm).
- w8a8: each layer's input is quantized to int8 too, in blocks of 32 with one scale each (the
  scheme of llama.cpp's q8_0 activations), and the products run in integers (csrc/w8a8_linear.c,
  built on first use: native.py). Needs AVX-512 VNNI; faster where the int8 kernel is
  compute-bound, at a small further cost in accuracy.
The token embedding stays as it was (a lookup reads one row). Nothing here trains: the weights are buffers.
"""

import ctypes
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import native
from common import GrafitoError
from configurator import check_options, one_of

CHOICES = ("", "int8", "w8a8")  # --quantize: '' keeps the weights in --dtype
RULES = {"quantize": one_of(*CHOICES)}


def check(method, device, compile=False):
    """Whether --quantize=method can run on device (resolved: cpu, cuda:0, ...): one clear error if not."""
    check_options({"quantize": method}, RULES)
    if method and not device.startswith("cpu"):
        raise GrafitoError(f"--quantize={method} runs on CPUs only (PyTorch's int8 weight-only kernel there); "
                           f"add --device=cpu, or leave --quantize out on {device}")
    if method and compile:
        raise GrafitoError(f"--quantize={method} runs eagerly: leave out --compile")
    if method == "w8a8" and not w8a8_library().w8a8_vectorized():
        raise GrafitoError("--quantize=w8a8 needs a CPU with AVX-512 VNNI, which this one lacks (its portable C "
                           "path is slow): use --quantize=int8")


def int8_rows(linear, scale_dtype):
    """(int8 weight, per-row scales in scale_dtype) of a linear layer: each row's largest |weight| maps to 127."""
    weight = linear.weight.detach().float()
    largest = weight.abs().amax(dim=1)
    scales = torch.where(largest > 0, largest / 127, 1.0).to(scale_dtype)  # an all-zero row (padding) stays 0
    rounded = torch.round(weight / scales.float()[:, None]).clamp(-127, 127)  # the stored scale, not the exact one
    return rounded.to(torch.int8), scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output row; bias kept as is."""

    def __init__(self, linear, scale_dtype):
        super().__init__()
        weight_int8, scales = int8_rows(linear, scale_dtype)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = self.in_features % 8 == 0  # the kernel reads whole groups of 8 inputs (others crash it)

    @property
    def weight(self):
        """The dequantized weight (what the fused loss and many-row products use)."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        dtype = input_dtype(x)
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


def input_dtype(x):
    """The dtype a quantized layer computes in: autocast's where it is on, else x's; one error if training."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise GrafitoError("int8 weights are for generation and evaluation: they cannot be trained")
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@functools.cache
def w8a8_library(extra_flags=()):
    """csrc/w8a8_linear.c, built for this CPU (native.py); extra_flags for tests' other builds."""
    library = native.load("w8a8_linear", extra_flags)
    library.w8a8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int]
    library.w8a8_linear.restype = ctypes.c_int
    return library


class W8A8Linear(nn.Module):
    """A linear layer with Int8Linear's weights whose input is quantized to int8 as well, in blocks
    of 32 values with one scale each, and multiplied in integers by csrc/w8a8_linear.c (CPUs)."""

    def __init__(self, linear, scale_dtype):
        super().__init__()
        weight_int8, scales = int8_rows(linear, scale_dtype)
        # stored as w + 128 in uint8: the kernel's instruction multiplies unsigned bytes by signed ones
        self.register_buffer("weight_uint8", (weight_int8.view(torch.uint8) ^ 0x80).contiguous())
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._float32 = None  # (scales, its version, bias, its version, their float32 copies): made once

    @property
    def weight(self):
        """The dequantized weight (what a float product of this layer would use)."""
        return (self.weight_uint8 ^ 0x80).view(torch.int8).to(self.scales.dtype) * self.scales[:, None]

    def float32_operands(self):
        """The scales and bias in float32 (the kernel's), copied again only when either was
        replaced (.to()) or changed in place (load_state_dict)."""
        scales, bias = self._buffers["scales"], self._parameters.get("bias")  # the dicts: forward's hot path
        cached = self._float32
        if (cached is None or cached[0] is not scales or cached[1] != scales._version or cached[2] is not bias
                or (bias is not None and cached[3] != bias._version)):
            converted = (scales.float().contiguous(), None if bias is None else bias.detach().float().contiguous())
            self._float32 = cached = (scales, scales._version, bias, None if bias is None else bias._version, converted)
        return cached[4]

    def forward(self, x):
        dtype = input_dtype(x)
        if x.device.type != "cpu":
            raise GrafitoError("--quantize=w8a8 runs on CPUs only")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"w8a8 layer: input of {x.shape[-1]} features, expected {self.in_features}")
        # the kernel reads and writes float32 or bf16; other dtypes go through float32
        kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        if x.dtype != kernel_dtype or not x.is_contiguous():
            x = x.to(kernel_dtype).contiguous()
        y = x.new_empty(x.shape[:-1] + (self.out_features,))
        scales, bias = self.float32_operands()  # held here while the kernel reads them
        half, rows = kernel_dtype == torch.bfloat16, x.numel() // self.in_features
        weight = self._buffers["weight_uint8"]
        if w8a8_library().w8a8_linear(x.data_ptr(), half, weight.data_ptr(), scales.data_ptr(),
                                      None if bias is None else bias.data_ptr(), y.data_ptr(), half, rows,
                                      self.out_features, self.in_features, torch.get_num_threads()):
            raise MemoryError(f"w8a8_linear: no memory for {rows} rows of activations")
        return y.to(dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8, scales {self.scales.dtype}"


LAYERS = {"int8": Int8Linear, "w8a8": W8A8Linear}


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
                setattr(module, name, LAYERS[method](child, dtype))
    return model
