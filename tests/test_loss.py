"""loss.py: the fused output layer + cross-entropy equals the plain reference, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

import loss
from model import GPT, GPTConfig


def tiny_gpt(seed=0, **config):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 70, **config}))


def masked_targets(B, T, vocab, unsupervised=0.6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (B, T), generator=generator)
    targets[torch.rand(B, T, generator=generator) < unsupervised] = -1
    return targets


def test_fused_loss_equals_plain_cross_entropy_mean_and_sum():
    model = tiny_gpt().eval()
    idx, targets = torch.randint(0, 70, (4, 32)), masked_targets(4, 32, 70)
    logits, reference = model(idx, targets, fused=False)
    expected = F.cross_entropy(logits.reshape(-1, 70), targets.reshape(-1), ignore_index=-1)
    assert torch.allclose(reference, expected, atol=1e-6)
    no_logits, fused = model(idx, targets)
    assert no_logits is None and torch.allclose(fused, expected, atol=1e-6)
    _, fused_sum = model(idx, targets, reduction="sum")
    assert torch.allclose(fused_sum, expected * (targets >= 0).sum(), rtol=1e-5)


def test_no_supervised_token_gives_loss_zero_and_zero_gradients():
    """A packed row can hold only prompt tokens; its loss is 0 and its gradient zero, not garbage."""
    model = tiny_gpt()
    torch.empty(1 << 20).fill_(float("nan"))  # leave NaNs in freed memory an uninitialised buffer could reuse
    _, value = model(torch.randint(0, 70, (2, 16)), torch.full((2, 16), -1))
    value.backward()
    assert value.item() == 0.0
    for name, param in model.named_parameters():
        assert param.grad is None or (param.grad == 0).all(), name


def test_model_gradients_equal_the_plain_reference():
    model = tiny_gpt()
    idx, targets = torch.randint(0, 70, (3, 16)), masked_targets(3, 16, 70, 0.5)
    model(idx, targets, fused=False)[1].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(idx, targets)[1].backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6), name


def test_host_computed_supervised_positions_give_the_same_loss():
    model = tiny_gpt().eval()
    idx, targets = torch.randint(0, 70, (2, 32)), masked_targets(2, 32, 70)
    positions = (targets.reshape(-1) >= 0).nonzero().squeeze(1)
    assert torch.equal(model(idx, targets, supervised=positions)[1], model(idx, targets)[1])


def test_fused_loss_over_several_chunks_equals_the_reference():
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(128, 32, requires_grad=True)  # 100 real rows + padding, as the tied embedding
    targets = torch.randint(0, 100, (300,))
    F.cross_entropy(F.linear(h, weight)[:, :100], targets, reduction="sum").backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    fused = loss.linear_cross_entropy(h, weight, targets, 100, chunk_rows=64)
    (fused * 0.5).backward()
    assert torch.allclose(fused, F.cross_entropy(F.linear(h, weight)[:, :100], targets, reduction="sum"), rtol=1e-5)
    assert torch.allclose(h.grad, expected_h * 0.5, atol=1e-5)
    assert torch.allclose(weight.grad, expected_w * 0.5, atol=1e-5) and (weight.grad[100:] == 0).all()


def test_bf16_fused_loss_equals_autocast_reference():
    torch.manual_seed(0)
    h, weight, targets = torch.randn(300, 32), torch.randn(128, 32), torch.randint(0, 100, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 softmax: as autocast's own path
        fused = loss.linear_cross_entropy(h, weight, targets, 100)
        reference = F.cross_entropy(F.linear(h, weight)[:, :100].float(), targets, reduction="sum")
    assert torch.allclose(fused, reference, rtol=1e-4)


def test_fp16_fused_loss_and_gradients_match_float32():
    torch.manual_seed(0)
    h = (torch.randn(200, 64) * 3).half().float().requires_grad_()  # values fp16 holds exactly
    weight = torch.randn(160, 64).half().float().requires_grad_()
    targets = torch.randint(0, 150, (200,))
    reference = F.cross_entropy(F.linear(h, weight)[:, :150], targets, reduction="sum")
    reference.backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        fused = loss.linear_cross_entropy(h, weight, targets, 150)
    fused.backward()
    relative_error = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert relative_error(fused, reference) < 1e-3  # fp16 logits: about 1e-3 relative
    assert relative_error(h.grad, expected_h) < 1e-2 and relative_error(weight.grad, expected_w) < 1e-2


def test_fp16_keeps_the_gradient_of_improbable_tokens():
    """Probabilities below fp16's range must not flush to zero before the grad scaler applies."""
    torch.manual_seed(0)
    h = (torch.rand(64, 32) + 0.5).half().float()
    weight = torch.randn(128, 32) * 0.3
    weight[100:] = -0.6  # these tokens' probabilities are about 1e-9
    weight = weight.half().float().requires_grad_()
    targets = torch.randint(0, 100, (64,))
    F.cross_entropy(F.linear(h, weight), targets, reduction="sum").backward()
    expected = weight.grad[100:].clone()
    weight.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        loss.linear_cross_entropy(h, weight, targets, 128).backward()
    assert expected.abs().max() > 0
    assert ((weight.grad[100:] - expected).abs().max() / expected.abs().max()).item() < 0.05


def test_fp16_training_with_the_grad_scaler_lowers_the_loss_without_skipped_steps():
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    idx, targets = torch.randint(0, 70, (4, 32)), masked_targets(4, 32, 70, 0.3)
    losses, scales = [], []
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.float16):
            _, value = model(idx, targets)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
        scales.append(scaler.get_scale())
    assert scales == sorted(scales)  # the scale never backed off: no step found inf/NaN gradients
    assert losses[-1] < 0.8 * losses[0]


def test_no_gradients_are_made_under_no_grad(monkeypatch):
    """Evaluation must not compute the (vocab x n_embd) weight gradient it would throw away."""
    made = []
    real = loss._LinearCrossEntropy.apply
    monkeypatch.setattr(loss._LinearCrossEntropy, "apply", lambda *args: made.append(args[-1]) or real(*args))
    model = tiny_gpt()
    idx, targets = torch.randint(0, 70, (2, 16)), masked_targets(2, 16, 70)
    with torch.no_grad():
        model(idx, targets)
    model(idx, targets)
    assert made == [False, True]


def test_compiled_model_gradients_equal_eager():
    model = tiny_gpt(block_size=16)
    idx, targets = torch.randint(0, 70, (2, 16)), masked_targets(2, 16, 70, 0.4)
    grads = []
    for run in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        run(idx, targets)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5), name


def test_a_compiled_model_does_not_recompile_for_new_supervised_counts():
    """Every batch supervises a different number of tokens; the compiled graph must not depend on it."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    model = tiny_gpt()
    compiled = torch.compile(model, backend=counting_backend)
    for step in range(6):
        targets = masked_targets(2, 32, 70, unsupervised=0.1 + 0.15 * step, seed=step)
        positions = (targets.reshape(-1) >= 0).nonzero().squeeze(1)  # as train.py passes them, from the host
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        compiled(torch.randint(0, 70, (2, 32)), targets, supervised=positions)[1].backward()
        compiled(torch.randint(0, 70, (2, 32)), targets)[1].backward()  # and found on the device
        if step == 0:
            after_first = len(graphs)
    assert len(graphs) == after_first


def padded_layer_inputs(seed=0):
    """h, a weight of 100 real rows and 28 padding rows (garbage, not zeros: masking must not
    rely on them being zero), targets."""
    torch.manual_seed(seed)
    weight = torch.randn(128, 32)
    weight[100:] = torch.randn(28, 32) * 5
    return torch.randn(300, 32), weight, torch.randint(0, 100, (300,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["cross_entropy", "log_probs"])
def test_padded_output_layer_equals_the_unpadded_one(dtype, layer):
    """The matmuls run over the padding rows; their masked columns change no value or gradient."""
    h, weight, targets = padded_layer_inputs()
    upstream = torch.randn(300)
    results = []
    for rows in (weight, weight[:100]):
        h_leaf, weight_leaf = h.clone().requires_grad_(), rows.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if layer == "cross_entropy":
                value = loss.linear_cross_entropy(h_leaf, weight_leaf, targets, 100, chunk_rows=64)
                value.backward()
            else:
                value = loss.linear_log_probs(h_leaf, weight_leaf, targets, 100, chunk_rows=64)
                (value * upstream).sum().backward()
        results.append((value, h_leaf.grad, weight_leaf.grad))
    (padded, padded_h, padded_w), (unpadded, unpadded_h, unpadded_w) = results
    assert torch.equal(padded, unpadded) and torch.equal(padded_h, unpadded_h)
    assert torch.equal(padded_w[:100], unpadded_w) and (padded_w[100:] == 0).all()


def test_fp16_gradients_of_large_hidden_states_stay_finite_and_accurate():
    """Summed over many rows, d loss / d weight leaves float16's range (65504): the products must
    accumulate and write float32, whatever the scaling inside."""
    torch.manual_seed(0)
    h = (torch.rand(2048, 64) * 100 + 150).half().float().requires_grad_()  # one sign: the row sums grow
    weight = (torch.randn(160, 64) * 0.01).half().float().requires_grad_()
    targets = torch.randint(0, 4, (2048,))  # few targets: each of their weight rows sums 500 rows of h
    F.cross_entropy(F.linear(h, weight)[:, :150], targets, reduction="sum").backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    assert expected_w.abs().max() > 65504
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        loss.linear_cross_entropy(h, weight, targets, 150).backward()
    relative_error = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert torch.isfinite(h.grad).all() and torch.isfinite(weight.grad).all()
    assert relative_error(h.grad, expected_h) < 1e-2 and relative_error(weight.grad, expected_w) < 1e-2


def test_fp16_log_probs_weight_gradient_keeps_every_row_under_any_upstream_scale():
    """DPO's upstream factors carry the grad scaler's scale (here up to 1e4 and down to 1e-4): the
    float16 gradient products must neither overflow on the large rows nor lose improbable tokens."""
    torch.manual_seed(0)
    h = (torch.rand(64, 32) + 0.5).half().float().requires_grad_()
    weight = torch.randn(128, 32) * 0.3
    weight[100:120] = -0.6  # these tokens' probabilities are about 1e-9
    weight = weight.half().float().requires_grad_()
    targets, upstream = torch.randint(0, 100, (64,)), torch.randn(64) * 10.0 ** torch.randint(-4, 5, (64,))
    expected = F.log_softmax(F.linear(h, weight)[:, :120], dim=-1).gather(1, targets[:, None])[:, 0]
    (expected * upstream).sum().backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        fused = loss.linear_log_probs(h, weight, targets, 120, chunk_rows=16)
    (fused * upstream).sum().backward()
    relative_error = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert relative_error(h.grad, expected_h) < 1e-2 and relative_error(weight.grad, expected_w) < 1e-2
    improbable, improbable_expected = weight.grad[100:120], expected_w[100:120]
    assert improbable_expected.abs().max() > 0 and relative_error(improbable, improbable_expected) < 0.05
    assert (weight.grad[120:] == 0).all()


@pytest.mark.parametrize("layer", ["cross_entropy", "log_probs"])
def test_a_second_backward_through_the_fused_layer_is_refused(layer):
    """Its gradients are made in the forward and scaled in place by the backward (saved tensors,
    whose version autograd checks): a second backward (retain_graph=True) must fail, not scale
    them twice."""
    h, weight, targets = padded_layer_inputs()
    h.requires_grad_()
    if layer == "cross_entropy":
        value = loss.linear_cross_entropy(h, weight, targets, 100)
    else:
        value = loss.linear_log_probs(h, weight, targets, 100).sum()
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()
