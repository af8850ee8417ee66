"""The training losses: cross-entropy over the supervised tokens only, with GPT-2's output
layer fused into it, and the masked validation loss built on it; for preference tuning,
each answer's summed log-probability (the same fused layer) and the DPO loss.

Chat fine-tuning supervises only the answers (about 40% of grafito-25k's tokens), so the
output layer (n_embd x 50257, the largest matmul of a 124M model) runs only at supervised
positions, and in row chunks whose softmax becomes its gradient on the spot: no
(tokens x vocab) float32 logits, log-softmax or their backward are kept for autograd.
model.forward(..., fused=False) is the plain F.cross_entropy reference it is tested against.
"""

import torch
import torch.nn.functional as F

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


def _output_layer_settings(h, weight):
    """(matmul dtype, gradient matmul dtype, whether to make gradients) for a fused output layer:
    the autocast dtype when autocast is on, but gradients in float32 under float16, whose range
    they would leave before the grad scaler can help; gradients only when autograd will ask."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    return dtype, grad_dtype, torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)


def linear_cross_entropy(h, weight, targets, vocab_size, chunk_rows=CHUNK_ROWS):
    """Equal to F.cross_entropy(F.linear(h, weight)[:, :vocab_size], targets, reduction='sum'),
    gradients included. Matmuls run in the autocast dtype when autocast is on (in float32
    when that is float16, whose range the gradient matmuls would leave before the grad
    scaler can help); softmax and loss in float32. Gradients are made in the forward pass
    only when autograd will ask for them."""
    return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_rows, *_output_layer_settings(h, weight))


def _output_layer_operands(h, weight, vocab_size, dtype, grad_dtype):
    """The weight's real-vocabulary rows in the matmul dtype and in the gradient dtype; h in the matmul dtype."""
    w = weight[:vocab_size].to(dtype)
    return w, w if grad_dtype == dtype else weight[:vocab_size].to(grad_dtype), h.to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, dtype, grad_dtype, grads):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            w, w_grad, hc = _output_layer_operands(h, weight, vocab_size, dtype, grad_dtype)
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
    from common import autocast, eval_mode

    total, count = torch.zeros((), device=device), 0
    with eval_mode(model):
        for x, y in batches:
            with autocast(device, dtype):
                _, loss_sum = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), reduction="sum")
            total += loss_sum.float()
            count += int((y >= 0).sum())
    return total.item() / max(count, 1)


# ----------------------------------------------------------------------------- preference tuning (DPO)

@torch.compiler.disable  # the supervised count changes every batch: compiled, it would recompile
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
    token_log_probs = linear_log_probs(rows, weight, flat_targets.index_select(0, supervised), vocab_size)
    return token_log_probs.new_zeros(B).index_add(0, supervised // T, token_log_probs)


def linear_log_probs(h, weight, targets, vocab_size, chunk_rows=CHUNK_ROWS):
    """Equal to F.log_softmax(F.linear(h, weight)[:, :vocab_size], -1).gather(1, targets[:, None])[:, 0],
    gradients included, for any upstream gradient (DPO weighs each answer's tokens by its
    own factor, known only after the forward).

    Precision as linear_cross_entropy. The gradient for h, d log p / d h, is made in the
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
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, dtype, grad_dtype, grads):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            w, w_grad, hc = _output_layer_operands(h, weight, vocab_size, dtype, grad_dtype)
            log_probs = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            for start in range(0, h.shape[0], chunk_rows):
                rows, t = hc[start:start + chunk_rows], targets[start:start + chunk_rows]
                logits = rows @ w.t()
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                top, top_index = logits.max(dim=-1, keepdim=True)  # log-sum-exp as linear_cross_entropy takes it
                chunk_lse = (top.float() - probs.gather(1, top_index).log()).squeeze(1)
                lse[start:start + chunk_rows] = chunk_lse
                log_probs[start:start + chunk_rows] = logits.gather(1, t[:, None]).float().squeeze(1) - chunk_lse
                if need_h:
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0  # -(d log p / d logits)
                    grad_h[start:start + chunk_rows] = -(probs.to(grad_dtype) @ w_grad)
        ctx.save_for_backward(grad_h, h if need_w else None, weight if need_w else None, targets, lse)
        ctx.settings = vocab_size, chunk_rows, dtype, grad_dtype
        return log_probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs):
        grad_h, h, weight, targets, lse = ctx.saved_tensors
        vocab_size, chunk_rows, dtype, grad_dtype = ctx.settings
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_log_probs[:, None].to(grad_h.dtype))  # made for this backward: scaled in place
        grad_w = None
        if weight is not None:
            with torch.autocast(device_type=h.device.type, enabled=False):
                w = weight[:vocab_size].to(dtype)
                hc, hg = h.to(dtype), h.to(grad_dtype)
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
                for start in range(0, h.shape[0], chunk_rows):
                    end = start + chunk_rows
                    t = targets[start:end]
                    probs = torch.exp((hc[start:end] @ w.t()).float() - lse[start:end, None])
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    g = (probs * -grad_log_probs[start:end, None].float()).to(grad_dtype)
                    grad_w[:vocab_size] += g.t() @ hg[start:end]
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


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
        return answer_log_probs(gpt.hidden_states(idx), gpt.lm_head.weight, targets, gpt.config.vocab_size, supervised)


@torch.no_grad()
def pair_log_probs(model, batches, device, dtype):
    """(log_probs, lengths), float32 and int64 (pairs, 2): the summed log-probability and the token
    count of each pair's chosen and rejected answer, in the batches' order, in eval mode under the
    dtype's autocast. batches: (pairs, x, y) as data.pair_eval_batches gives them. What DPO's
    reference and evaluation read, and eval.py's preference accuracy."""
    from common import autocast, eval_mode

    log_probs, lengths = [torch.zeros(0, 2)], [torch.zeros(0, 2, dtype=torch.int64)]
    with eval_mode(model):
        for _, x, y in batches:
            with autocast(device, dtype):
                row_log_probs = AnswerLogProbs(model)(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            log_probs.append(row_log_probs.float().cpu().view(2, -1).t())  # rows: the chosen ones, then the rejected
            lengths.append(torch.from_numpy((y >= 0).sum(1)).view(2, -1).t())
    return torch.cat(log_probs), torch.cat(lengths)
