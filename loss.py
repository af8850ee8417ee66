"""The training loss: cross-entropy over the supervised tokens only, with GPT-2's output
layer fused into it, and the masked validation loss built on it.

Chat fine-tuning supervises only the answers (about 40% of grafito-25k's tokens), so the
output layer (n_embd x 50257, the largest matmul of a 124M model) runs only at supervised
positions, and in row chunks whose softmax becomes its gradient on the spot: no
(tokens x vocab) float32 logits, log-softmax or their backward are kept for autograd.
model.forward(..., fused=False) is the plain F.cross_entropy reference it is tested against.
"""

import torch

CHUNK_ROWS = 1024  # rows of logits alive at once: bounds memory whatever the batch


@torch.compiler.disable  # the supervised count changes every batch: compiled, it would recompile
def supervised_cross_entropy(hidden, weight, targets, vocab_size, supervised=None):
    """Summed cross-entropy of logits = hidden @ weight[:vocab_size].T against targets, over
    the positions whose target is not negative.

    hidden (B, T, C), targets (B, T). supervised: those positions' flat indices if the caller
    has them (from the host batch: no device-to-host sync here); else found from targets.
    """
    flat_targets = targets.reshape(-1)
    if supervised is None:
        supervised = (flat_targets >= 0).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised)
    return linear_cross_entropy(rows, weight, flat_targets.index_select(0, supervised), vocab_size)


def linear_cross_entropy(h, weight, targets, vocab_size, chunk_rows=CHUNK_ROWS):
    """Equal to F.cross_entropy(F.linear(h, weight)[:, :vocab_size], targets, reduction='sum'),
    gradients included. Matmuls run in the autocast dtype when autocast is on (in float32
    when that is float16, whose range the gradient matmuls would leave before the grad
    scaler can help); softmax and loss in float32. Gradients are made in the forward pass
    only when autograd will ask for them."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_rows, dtype, grad_dtype, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, dtype, grad_dtype, grads):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight[:vocab_size].to(dtype)
            w_grad = w if grad_dtype == dtype else weight[:vocab_size].to(grad_dtype)
            hc = h.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            if need_w:  # the first chunk writes the real rows; padding rows (and all, without chunks) stay zero
                (grad_w if h.shape[0] == 0 else grad_w[vocab_size:]).zero_()
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
                    g = probs.to(grad_dtype)
                    if need_h:
                        grad_h[start:start + chunk_rows] = g @ w_grad
                    if need_w:
                        update = g.t() @ rows.to(grad_dtype)
                        if start == 0:
                            grad_w[:vocab_size] = update
                        else:
                            grad_w[:vocab_size] += update
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # made for this one backward: scaled in place
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


@torch.no_grad()
def masked_val_loss(model, batches, device, dtype):
    """Mean cross-entropy over every supervised token of (x, y) numpy batches, in eval mode
    under the dtype's autocast: what train.py logs and eval.py reports."""
    from common import autocast

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in batches:
        with autocast(device, dtype):
            _, loss_sum = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), reduction="sum")
        total += loss_sum.float()
        count += int((y >= 0).sum())
    model.train(was_training)
    return total.item() / max(count, 1)
