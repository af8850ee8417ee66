"""The training losses: cross-entropy over the supervised tokens only, with GPT-2's output
layer fused into it, and the masked validation loss built on it; for preference tuning,
each answer's summed log-probability (the same fused layer) and the DPO loss.

Chat fine-tuning supervises only the answers (about 40% of grafito-25k's tokens), so the
output layer (n_embd x 50257, the largest matmul of a 124M model) runs only at supervised
positions, and in row chunks whose softmax becomes its gradient on the spot: no
(tokens x vocab) float32 logits, log-softmax or their backward are kept for autograd.
model.forward(..., fused=False) is the plain F.cross_entropy reference it is tested against.
"""

import functools

import torch
import torch.nn.functional as F

from common import autocast, eval_mode

CHUNK_ROWS = 1024  # rows of logits alive at once: bounds memory whatever the batch
# d loss / d logits lies in [-1, 1]; scaled by 2^15 it stays below float16's largest value (65504)
# while probabilities down to about 1e-12 keep a gradient (float16's smallest number is 6e-8)
FLOAT16_GRADIENT_SCALE = 2.0 ** 15


def not_compiled(fn):
    """fn, run eagerly when called from a compiled model (torch.compiler.disable), the mark made
    at the first compiled call: making it at import would import torch._dynamo, a second of
    every command's start-up, though only compiled runs need it."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call
MM_WRITES_FLOAT32 = hasattr(torch.ops.aten.mm, "dtype")  # torch >= 2.8: torch.mm(..., out_dtype=torch.float32)


@not_compiled  # the supervised count changes every batch: compiled, it would recompile
def supervised_cross_entropy(hidden, weight, targets, vocab_size, supervised=None):
    """Summed cross-entropy of logits = hidden @ weight[:vocab_size].T against targets, over
    the positions whose target is not negative. weight may also be a quantized output layer
    (evaluation only, GPT.output_layer()), which then computes the logits itself.

    hidden (B, T, C), targets (B, T). supervised: those positions' flat indices if the caller
    has them (from the host batch: no device-to-host sync here); else found from targets.
    """
    flat_targets = targets.reshape(-1)
    if supervised is None:
        supervised = (flat_targets >= 0).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised)
    if isinstance(weight, torch.nn.Module):
        total = hidden.new_zeros((), dtype=torch.float32)
        for logits, chunk_targets in layer_logits(weight, rows, flat_targets.index_select(0, supervised), vocab_size):
            total = total + F.cross_entropy(logits, chunk_targets, reduction="sum")
        return total
    return linear_cross_entropy(rows, weight, flat_targets.index_select(0, supervised), vocab_size)


def layer_logits(layer, rows, targets, vocab_size):
    """(float32 logits, targets) chunk by chunk from a quantized output layer (quantize.py), which
    computes its own product: evaluation only, no gradient."""
    for chunk, chunk_targets in zip(rows.split(CHUNK_ROWS), targets.split(CHUNK_ROWS)):
        yield layer(chunk)[:, :vocab_size].float(), chunk_targets


def _output_layer_settings(h, weight):
    """(matmul dtype, whether to make gradients) for a fused output layer: the autocast dtype
    when autocast is on; gradients only when autograd will ask for them."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    return dtype, torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)


def linear_cross_entropy(h, weight, targets, vocab_size, chunk_rows=CHUNK_ROWS):
    """Equal to F.cross_entropy(F.linear(h, weight)[:, :vocab_size], targets, reduction='sum'),
    gradients included. Precision and padding as _OutputLayer says; gradients are made in
    the forward pass only when autograd will ask for them."""
    return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_rows, *_output_layer_settings(h, weight))


class _OutputLayer:
    """One call's operands of the fused output layer (h @ weight.T, then softmax), and the chunk
    loop both fused layers run.

    Padding: the weight's rows past vocab_size (the embedding is padded to a multiple of 64,
    which suits the matmul kernels) take part in every product, and their logits are set to
    -inf: probability 0 and gradient 0, exactly as if those rows were cut off.
    Precision: logits in the matmul dtype (autocast's), softmax and log-sum-exp in float32.
    The gradient products take their inputs in the matmul dtype and accumulate in float32,
    writing float32 where cuBLAS can (CUDA, torch >= 2.8; elsewhere float16 inputs are widened
    to float32, exactly, and bfloat16 products written in bfloat16). Under float16, d loss /
    d logits is multiplied by FLOAT16_GRADIENT_SCALE before its rounding and divided after the
    products (in float32), so that improbable tokens keep their gradient: the grad scaler's
    scale reaches this gradient only in the backward, after it is made.
    """

    def __init__(self, h, weight, vocab_size, dtype):
        self.vocab_size, self.h_shape, self.h_dtype, self.weight_shape = vocab_size, h.shape, h.dtype, weight.shape
        self.h_source, self.h, self.w = h, h.to(dtype), weight.to(dtype)
        self.writes_float32 = MM_WRITES_FLOAT32 and h.is_cuda and dtype in (torch.float16, torch.bfloat16)
        self.widens = dtype == torch.float16 and not self.writes_float32
        self.gradient_scale = FLOAT16_GRADIENT_SCALE if dtype == torch.float16 else 1.0
        self.gradient_dtype = dtype

    def product(self, a, b):
        """a @ b, accumulated in float32: written in float32 where cuBLAS can or the inputs are
        widened, else (bfloat16 off CUDA) in the matmul dtype."""
        if self.writes_float32:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float() if self.widens else a @ b

    def chunks(self, targets, chunk_rows, grad_h=False, grad_w=False, row_factors=None, lse=None):
        """(lse, target_logits, grad_h, grad_w): each row's log-sum-exp of its logits and its
        target's logit (float32); if asked, the gradients of the rows' cross-entropies
        (lse - target logit), for h (h's dtype) and, each row weighted by its row_factor (1
        without), for the weight (float32, zero in the padding rows). lse given (from an earlier
        pass): the probabilities are exp(logits - lse), without the softmax's reductions.
        """
        rows_total, device = self.h_shape[0], self.h.device
        target_logits = torch.empty(rows_total, dtype=torch.float32, device=device)
        find_lse = lse is None
        if find_lse:
            lse = torch.empty(rows_total, dtype=torch.float32, device=device)
        grad_h = torch.empty(self.h_shape, dtype=self.h_dtype, device=device) if grad_h else None
        w_for_grads = self.w.float() if self.widens and grad_h is not None else self.w
        h_for_grads, h_unscale = self._weighted_rows(row_factors) if grad_w else (None, None)
        scale = self.gradient_scale
        weight_sum = None
        for start in range(0, rows_total, chunk_rows):
            end = start + chunk_rows
            rows, t = self.h[start:end], targets[start:end]
            logits = rows @ self.w.t()
            logits[:, self.vocab_size:] = float("-inf")  # the padding: probability 0, gradient 0
            target_logits[start:end] = logits.gather(1, t[:, None]).squeeze(1)
            if find_lse:
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                # log-sum-exp, exactly, from the largest logit and its probability (never below 1/vocab)
                top, top_index = logits.max(dim=-1, keepdim=True)
                lse[start:end] = (top.float() - probs.gather(1, top_index).log()).squeeze(1)
            else:
                probs = logits.float().sub_(lse[start:end, None]).exp_()
            if grad_h is None and not grad_w:
                continue
            probs[torch.arange(len(t), device=device), t] -= 1.0  # d (lse - target logit) / d logits
            if scale == 1.0:
                g = probs.to(self.gradient_dtype)
            else:  # scaled and rounded in one pass
                g = torch.mul(probs, scale, out=torch.empty_like(probs, dtype=self.gradient_dtype))
            if grad_h is not None:
                chunk_grad = self.product(g, w_for_grads)
                grad_h[start:end] = chunk_grad if scale == 1.0 else chunk_grad.mul_(1.0 / scale)
            if grad_w:
                update = self.product(g.t(), h_for_grads[start:end])
                weight_sum = update.float() if weight_sum is None else weight_sum.add_(update)
        if not grad_w:
            return lse, target_logits, grad_h, None
        weight_sum = self._whole_weight_gradient(weight_sum)
        if h_unscale is not None or scale != 1.0:
            weight_sum.mul_((1.0 if h_unscale is None else h_unscale) / scale)
        return lse, target_logits, grad_h, weight_sum

    def _weighted_rows(self, row_factors):
        """(h's rows as the weight's gradient product takes them, the factor undoing their scaling
        or None): each weighted by its row_factor if given; under float16 then scaled so that the
        largest entry is FLOAT16_GRADIENT_SCALE, whatever the factors' range (DPO's carry the
        grad scaler's scale)."""
        if row_factors is None:
            return self.h, None
        weighted = self.h_source.float() * row_factors[:, None]
        if self.gradient_scale == 1.0:
            return weighted.to(self.gradient_dtype), None
        top = weighted.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        return (weighted * (FLOAT16_GRADIENT_SCALE / top)).to(self.gradient_dtype), top / FLOAT16_GRADIENT_SCALE

    def _whole_weight_gradient(self, weight_sum):
        """The weight's gradient, all rows: zeros without any row, and zero rows past those multiplied."""
        if weight_sum is None:
            return torch.zeros(self.weight_shape, dtype=torch.float32, device=self.h.device)
        missing = self.weight_shape[0] - weight_sum.shape[0]
        return F.pad(weight_sum, (0, 0, 0, missing)) if missing else weight_sum


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, dtype, grads):
        with torch.autocast(device_type=h.device.type, enabled=False):
            layer = _OutputLayer(h, weight, vocab_size, dtype)
            lse, target_logits, grad_h, grad_w = layer.chunks(targets, chunk_rows, grad_h=grads and ctx.needs_input_grad[0],
                                                              grad_w=grads and ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return (lse - target_logits).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # made for this one backward: scaled in place
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


@torch.no_grad()
def masked_val_loss(model, batches, device, dtype):
    """Mean cross-entropy over every supervised token of (x, y) numpy batches, in eval mode
    under the dtype's autocast: what train.py logs and eval.py reports."""
    total, count = torch.zeros((), device=device), 0
    with eval_mode(model):
        for x, y in batches:
            with autocast(device, dtype):
                _, loss_sum = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), reduction="sum")
            total += loss_sum.float()
            count += int((y >= 0).sum())
    return total.item() / max(count, 1)


# ----------------------------------------------------------------------------- preference tuning (DPO)

@not_compiled  # the supervised count changes every batch: compiled, it would recompile
def answer_log_probs(hidden, weight, targets, vocab_size, supervised=None):
    """Each row's summed log-probability of its supervised tokens (its answer), (B,) float32.

    hidden (B, T, C), targets (B, T) as for supervised_cross_entropy; the output layer runs
    only at the supervised positions (linear_log_probs), and a row without one sums to 0.
    """
    B, T = targets.shape
    flat_targets = targets.reshape(-1)
    if supervised is None:
        supervised = (flat_targets >= 0).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised)
    if isinstance(weight, torch.nn.Module):  # a quantized output layer
        token_log_probs = torch.cat([hidden.new_zeros(0, dtype=torch.float32)] + [
            F.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None])[:, 0]
            for logits, chunk_targets in layer_logits(weight, rows, flat_targets.index_select(0, supervised), vocab_size)])
    else:
        token_log_probs = linear_log_probs(rows, weight, flat_targets.index_select(0, supervised), vocab_size)
    return token_log_probs.new_zeros(B).index_add(0, supervised // T, token_log_probs)


def linear_log_probs(h, weight, targets, vocab_size, chunk_rows=CHUNK_ROWS):
    """Equal to F.log_softmax(F.linear(h, weight)[:, :vocab_size], -1).gather(1, targets[:, None])[:, 0],
    gradients included, for any upstream gradient (DPO weighs each answer's tokens by its
    own factor, known only after the forward).

    Precision and padding as _OutputLayer says. The gradient for h, d log p / d h, is made in the
    forward pass, chunk by chunk as its softmax goes by; the backward only scales its rows by
    the upstream gradient. The weight's gradient sums over rows with different upstream
    factors, so when the weight is trained (full fine-tuning) the backward recomputes each
    chunk's logits from h and the saved log-sum-exp: one more output-layer matmul, at the
    supervised positions only, instead of keeping (rows x vocab) probabilities. A LoRA run's
    output layer is frozen and pays nothing extra.
    """
    return _LinearLogProbs.apply(h, weight, targets, vocab_size, chunk_rows, *_output_layer_settings(h, weight))


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, dtype, grads):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            lse, target_logits, grad_h, _ = _OutputLayer(h, weight, vocab_size, dtype).chunks(targets, chunk_rows, grad_h=need_h)
        # grad_h holds d (-log p) / d h, row by row
        ctx.save_for_backward(grad_h, h if need_w else None, weight if need_w else None, targets, lse)
        ctx.settings = vocab_size, chunk_rows, dtype
        return target_logits - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs):
        grad_h, h, weight, targets, lse = ctx.saved_tensors
        vocab_size, chunk_rows, dtype = ctx.settings
        if grad_h is not None:
            grad_h = grad_h.mul_(-grad_log_probs[:, None].to(grad_h.dtype))  # made for this backward: scaled in place
        grad_w = None
        if weight is not None:  # recomputed from h and the saved log-sum-exp, weighted by the upstream gradient
            with torch.autocast(device_type=h.device.type, enabled=False):
                layer = _OutputLayer(h, weight, vocab_size, dtype)
                _, _, _, grad_w = layer.chunks(targets, chunk_rows, grad_w=True, row_factors=-grad_log_probs.float(), lse=lse)
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing=0.0):
    """Per-pair DPO losses (Rafailov et al., 2023, arXiv:2305.18290) from summed answer
    log-probabilities, and the implicit rewards beta * (log pi - log pi_ref) of both answers.

    label_smoothing eps > 0 is conservative DPO: the label is taken to be wrong with
    probability eps, so the loss no longer drives the margin to infinity.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margins = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


DPO_STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def dpo_stats(losses, chosen_rewards, rejected_rewards):
    """Sums over pairs of DPO_STATS, a float32 vector: summed over micro-batches and processes,
    then divided by the pair count. A tie counts as half right, so a policy still equal to its
    reference (every reward 0) scores 0.5, chance."""
    right = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return torch.stack([losses.detach().sum(), right.sum(), (chosen_rewards - rejected_rewards).sum(),
                        chosen_rewards.sum(), rejected_rewards.sum()]).float()


class AnswerLogProbs(torch.nn.Module):
    """A GPT as forward(idx, targets, supervised=None) -> each row's summed answer log-probability
    (B,): the module a DPO run trains, so that DDP and torch.compile wrap it as they wrap the GPT
    for SFT (a method called around DDP's forward would not synchronise gradients)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets, supervised=None):
        gpt = self.gpt
        return answer_log_probs(gpt.hidden_states(idx), gpt.output_layer(), targets, gpt.config.vocab_size, supervised)


@torch.no_grad()
def pair_log_probs(model, batches, device, dtype):
    """(log_probs, lengths), float32 and int64 (pairs, 2): the summed log-probability and the token
    count of each pair's chosen and rejected answer, in the batches' order, in eval mode under the
    dtype's autocast. batches: (pairs, x, y) as data.pair_eval_batches gives them. What DPO's
    reference and evaluation read, and eval.py's preference accuracy."""
    log_probs, lengths = [torch.zeros(0, 2)], [torch.zeros(0, 2, dtype=torch.int64)]
    with eval_mode(model):
        for _, x, y in batches:
            with autocast(device, dtype):
                row_log_probs = AnswerLogProbs(model)(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            log_probs.append(row_log_probs.float().cpu().view(2, -1).t())  # rows: the chosen ones, then the rejected
            lengths.append(torch.from_numpy((y >= 0).sum(1)).view(2, -1).t())
    return torch.cat(log_probs), torch.cat(lengths)
