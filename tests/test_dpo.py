"""DPO (train.py --objective=dpo): the loss and its gradients against a plain computation, the reference
model (LoRA's adapters switched off, full fine-tuning's stored log-probabilities), learning a preference,
resume, DDP, options; eval.py's preference accuracy; bench.py's dpo rows."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import dpo
import eval as grafito_eval
import lora
import loss
import tokenizer
import train
from common import GrafitoError
from configurator import load_config
from conftest import ROOT, random_gpt_folder
from model import GPT, GPTConfig

EOT = tokenizer.EOT
TINY = ["--objective=dpo", "--block_size=16", "--batch_size=8", "--device=cpu", "--dtype=float32", "--plot=false",
        "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--beta=0.5"]
LORA = ["--lora_r=4", "--lora_targets=q,v,mlp_fc", "--learning_rate=2e-2"]
KINDS = {"full": [], "lora": LORA, "lora_stored": LORA + ["--dpo_reference=stored"]}  # how the reference is had


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: two threads fight each other (and other jobs) and run slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sums(folder, val_count=40, seed=0):
    """The preference set with an obvious rule: '3+4=' is answered ' 7' (chosen) rather than ' 3', the
    first number repeated (rejected). Val pairs have questions no train pair asks."""
    pairs = [(tokenizer.encode(f"{a}+{b}="), tokenizer.encode(f" {a + b}") + [EOT], tokenizer.encode(f" {a}") + [EOT])
             for a in range(20) for b in range(1, 10)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return data.write_pairs(folder, {"train": [pairs[i] for i in order[val_count:]],
                                     "val": [pairs[i] for i in order[:val_count]]},
                            {"dataset": "sums", "vocab_size": 50257, "block_size": 16})


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sums"
    write_sums(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random GPT-2 with the real vocabulary, the model DPO starts from."""
    return random_gpt_folder(tmp_path_factory.mktemp("model") / "base", n_embd=32, block_size=64)


def run(tmp_path, dataset, base, *overrides, out="out"):
    config = train.load_train_config(TINY + [f"--dataset={dataset}", f"--init_from={base}",
                                             f"--out_dir={tmp_path / out}", *overrides])
    train.check_config(config)
    return train.train(config)


def logged(out_dir, key):
    rows = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **kwargs)


# ----------------------------------------------------------------------------- written plainly, for comparison

def plain_answer_log_probs(gpt, x, y):
    """Each row's summed log-probability of its supervised tokens, from the full logits."""
    log_probs = F.log_softmax(gpt(x)[0].float(), dim=-1)
    token = log_probs.gather(2, y.clamp(min=0)[..., None])[..., 0]
    return (token * (y >= 0)).sum(1)


def plain_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing):
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return (-(1 - label_smoothing) * torch.log(torch.sigmoid(margin))
            - label_smoothing * torch.log(torch.sigmoid(-margin))).mean()


def a_batch(dataset, pairs):
    x, y = data.PairBatches(data.load_pairs(dataset, "train"), 16).batch(pairs)
    return torch.from_numpy(x), torch.from_numpy(y)


def nudged(model, seed=1, scale=0.02):
    """The model with every trainable weight moved a little: a policy that differs from its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("weight_trained", [True, False])
def test_linear_log_probs_equal_log_softmax_under_any_upstream_gradient(weight_trained):
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(128, 32, requires_grad=weight_trained)  # 100 real rows + padding, as the tied embedding
    targets, upstream = torch.randint(0, 100, (300,)), torch.randn(300)
    expected = F.log_softmax(F.linear(h, weight)[:, :100], dim=-1).gather(1, targets[:, None])[:, 0]
    (expected * upstream).sum().backward()
    expected_h, expected_w = h.grad.clone(), weight.grad.clone() if weight_trained else None
    h.grad, weight.grad = None, None
    fused = loss.linear_log_probs(h, weight, targets, 100, chunk_rows=64)
    (fused * upstream).sum().backward()
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.allclose(h.grad, expected_h, atol=1e-5)
    if weight_trained:
        assert torch.allclose(weight.grad, expected_w, atol=1e-5) and (weight.grad[100:] == 0).all()


def test_answer_log_probs_sum_to_minus_the_sft_loss():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=70)).eval()
    x, y = torch.randint(0, 70, (3, 32)), torch.randint(0, 70, (3, 32))
    y[torch.rand(3, 32) < 0.5] = -1
    y[1] = -1  # a row without an answer sums to 0
    log_probs = loss.AnswerLogProbs(gpt)(x, y)
    assert log_probs[1] == 0 and torch.allclose(log_probs, plain_answer_log_probs(gpt, x, y), atol=1e-5)
    assert torch.allclose(-log_probs.sum(), gpt(x, y, reduction="sum")[1], atol=1e-4)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_dpo_loss_and_gradients_equal_separate_policy_and_reference_passes(sums, base, kind, label_smoothing):
    """grafito: one forward of chosen and rejected rows, the fused output layer, the reference from
    adapters switched off (LoRA) or a copy kept aside (full); the test: full logits of a policy and a
    separate frozen reference, the DPO formula written out."""
    beta, n = 0.5, 6
    x, y = a_batch(sums, list(range(n)))
    reference = GPT.from_pretrained(base).eval().requires_grad_(False)
    policy = GPT.from_pretrained(base).eval()
    if kind == "lora":
        lora.apply_lora(policy, lora.LoRAConfig(r=4, dropout=0.0, targets=("q", "v", "mlp_fc")))
    nudged(policy)
    plain_policy = plain_answer_log_probs(policy, x, y)
    with torch.no_grad():
        plain_reference = plain_answer_log_probs(reference, x, y)
    expected = plain_dpo(plain_policy[:n], plain_policy[n:], plain_reference[:n], plain_reference[n:], beta,
                         label_smoothing)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad(set_to_none=True)

    log_probs = loss.AnswerLogProbs(policy)(x, y)
    with torch.no_grad():
        if kind == "lora":
            with lora.adapters_off(policy):
                reference_log_probs = loss.AnswerLogProbs(policy)(x, y)
        else:
            reference_log_probs = loss.AnswerLogProbs(reference)(x, y)
    losses, chosen, rejected = loss.dpo_loss(log_probs[:n], log_probs[n:], reference_log_probs[:n],
                                             reference_log_probs[n:], beta, label_smoothing)
    losses.mean().backward()
    assert torch.allclose(losses.mean(), expected, atol=1e-5), (losses.mean(), expected)
    assert torch.allclose(chosen, beta * (plain_policy[:n] - plain_reference[:n]), atol=1e-5)
    assert torch.allclose(rejected, beta * (plain_policy[n:] - plain_reference[n:]), atol=1e-5)
    assert expected_grads and any(g.abs().max() > 1e-4 for g in expected_grads.values())
    for name, param in policy.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected_grads[name], atol=1e-5), name


def test_dpo_stats_count_ties_as_half():
    rewards = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 2.0])
    losses, _, _ = loss.dpo_loss(rewards[0], rewards[1], torch.zeros(3), torch.zeros(3), beta=1.0)
    stats = dict(zip(loss.DPO_STATS, loss.dpo_stats(losses, *rewards).tolist()))
    assert stats["reward_accuracy"] == 1.5 and stats["reward_margin"] == pytest.approx(-2.0)
    assert stats["chosen_reward"] == 0.0 and stats["rejected_reward"] == 2.0
    assert stats["loss"] == pytest.approx(-(F.logsigmoid(torch.tensor([1.0, 0.0, -3.0]))).sum().item())


def test_step_loss_pairs_each_policy_row_with_its_own_reference_row():
    """Chosen and rejected reference values that differ: a reference passed the other way round
    (rejected first) changes the loss, the rewards and the accuracy."""
    generator = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(10, generator=generator) * 3, torch.randn(10, generator=generator) * 3
    beta, n = 0.5, 5
    for label_smoothing in (0.0, 0.2):
        total, stats = dpo.step_loss(policy, reference, beta, label_smoothing)
        expected = plain_dpo(policy[:n], policy[n:], reference[:n], reference[n:], beta, label_smoothing) * n
        assert total.item() == pytest.approx(expected.item(), abs=1e-5)
        chosen, rejected = beta * (policy[:n] - reference[:n]), beta * (policy[n:] - reference[n:])
        assert dict(zip(loss.DPO_STATS, stats.tolist())) == pytest.approx({
            "loss": expected.item(), "reward_accuracy": float((chosen > rejected).sum()),
            "reward_margin": (chosen - rejected).sum().item(), "chosen_reward": chosen.sum().item(),
            "rejected_reward": rejected.sum().item()}, abs=1e-5)
        swapped, _ = dpo.step_loss(policy, torch.cat([reference[n:], reference[:n]]), beta, label_smoothing)
        assert abs(swapped.item() - total.item()) > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_a_runs_logged_train_loss_equals_a_plain_recomputation(tmp_path, sums, base, kind):
    """Step 2's logged loss (the policy after one update against the starting model, on step 2's
    pairs) equals the DPO formula over separate full-logit passes of the two models."""
    no_dropout = "--lora_dropout=0"  # the plain passes below run without dropout
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1", *KINDS[kind], no_dropout, out="one")
    run(tmp_path, sums, base, "--max_iters=2", "--eval_interval=2", *KINDS[kind], no_dropout, out="two")
    sampler = data.PairBatches(data.load_pairs(sums, "train"), 16, seed=1337, length_group=dpo.PAIR_LENGTH_GROUP)
    sampler.next_pairs(8)
    pairs = sampler.next_pairs(8)
    x, y = (torch.from_numpy(a) for a in sampler.batch(pairs))
    policy = checkpoint.load_model(tmp_path / "one" / checkpoint.LATEST).eval()
    reference = GPT.from_pretrained(base).eval()
    with torch.no_grad():
        p, r = plain_answer_log_probs(policy, x, y), plain_answer_log_probs(reference, x, y)
    assert (r[:8] - r[8:]).abs().max() > 0.1  # chosen and rejected reference values differ
    expected = plain_dpo(p[:8], p[8:], r[:8], r[8:], 0.5, 0.0).item()
    assert logged(tmp_path / "two", "train_loss")[2] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - np.log(2)) > 1e-3  # the policy moved: not the loss of a policy equal to its reference


@pytest.mark.parametrize("change", ["--beta=0.1", "--label_smoothing=0.1"])
def test_a_resume_refuses_a_change_to_what_the_loss_means(tmp_path, sums, base, change):
    """best/ compares val DPO losses: a resume at another beta or smoothing would compare different losses."""
    run(tmp_path, sums, base, "--max_iters=2", "--eval_interval=2")
    key = change[2:].split("=")[0]
    with pytest.raises(GrafitoError, match=rf"cannot resume with different {key} \("):
        run(tmp_path, sums, base, "--max_iters=4", "--init_from=resume", change)


# ----------------------------------------------------------------------------- the reference model

def test_adapters_off_is_the_frozen_base(base):
    base_model = GPT.from_pretrained(base).eval()
    model = lora.apply_lora(GPT.from_pretrained(base), lora.LoRAConfig(r=4, targets=("q", "v", "mlp_fc"))).eval()
    nudged(model)
    idx = torch.randint(0, 50257, (2, 12))
    adapted = model(idx)[0]
    with lora.adapters_off(model):
        assert torch.equal(model(idx)[0], base_model(idx)[0])
    assert torch.equal(model(idx)[0], adapted)  # switched back on
    with pytest.raises(RuntimeError), lora.adapters_off(model):
        raise RuntimeError("the adapters come back on after an error too")
    assert torch.equal(model(idx)[0], adapted)
    lora.merge_lora(model)
    with pytest.raises(GrafitoError, match="merged"), lora.adapters_off(model):
        pass


def test_the_lora_reference_is_the_base_in_eval_mode_without_gradient_and_leaves_the_model_as_it_was(base):
    base_model = GPT.from_pretrained(base).eval()
    model = lora.apply_lora(GPT.from_pretrained(base, dropout=0.5), lora.LoRAConfig(r=4)).train()
    nudged(model)
    reference = dpo.Reference(model, loss.AnswerLogProbs(model), "cpu", "float32")
    x = torch.randint(0, 50257, (2, 12))
    y = torch.full((2, 12), -1)
    y[:, 8:] = x[:, 8:]  # the last four positions are the answer
    supervised = torch.from_numpy(np.flatnonzero(y.numpy() >= 0))
    rows = reference.rows(None, x, y, supervised)
    assert not rows.requires_grad  # no graph through the reference: no dropout draws either (eval mode)
    assert torch.allclose(rows, loss.AnswerLogProbs(base_model)(x, y), atol=1e-6)
    assert model.training and not torch.allclose(loss.AnswerLogProbs(model.eval())(x, y), rows)  # adapters back on


def test_a_stored_reference_gives_each_pair_its_own_values_chosen_rows_first(base):
    model = GPT.from_pretrained(base)
    stored = {"train": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "val": torch.zeros(1, 2)}
    reference = dpo.Reference(model, None, "cpu", "float32", stored)
    assert reference.rows([2, 0], None, None, None).tolist() == [5.0, 1.0, 6.0, 2.0]
    with pytest.raises(GrafitoError, match="LoRA adapters to switch off"):
        dpo.Reference(model, None, "cpu", "float32")


def plain_val_metrics(policy, reference, dataset, beta):
    """The val DPO loss and reward accuracy of a policy against a reference, one pair at a time."""
    split = data.load_pairs(dataset, "val")
    batcher = data.PairBatches(split, 16, shuffle=False)
    losses, right = [], []
    with torch.no_grad():
        for i in range(split.num_pairs):
            x, y = map(torch.from_numpy, batcher.batch([i]))
            p, r = plain_answer_log_probs(policy, x, y), plain_answer_log_probs(reference, x, y)
            losses.append(plain_dpo(p[:1], p[1:], r[:1], r[1:], beta, 0.0).item())
            right.append(float((p[0] - r[0]) > (p[1] - r[1])))
    return float(np.mean(losses)), float(np.mean(right))


@pytest.mark.parametrize("kind", KINDS)
def test_logged_val_metrics_are_the_policy_against_a_frozen_copy_of_the_start(tmp_path, sums, base, kind):
    """The whole run's wiring: for LoRA the reference is the model with adapters off (or stored),
    for full fine-tuning the stored log-probabilities; each must be the starting model's."""
    run(tmp_path, sums, base, "--max_iters=6", "--eval_interval=6", *KINDS[kind])
    assert (tmp_path / "out" / dpo.REFERENCE_FILE).exists() == (kind != "lora")
    trained = checkpoint.load_model(tmp_path / "out" / checkpoint.LATEST).eval()  # adapters merged into the base
    val_loss, accuracy = plain_val_metrics(trained, GPT.from_pretrained(base).eval(), sums, beta=0.5)
    assert logged(tmp_path / "out", "val_loss")[0] == pytest.approx(np.log(2), abs=1e-6)  # the start is its reference
    assert logged(tmp_path / "out", "val_loss")[6] == pytest.approx(val_loss, abs=1e-4)
    assert logged(tmp_path / "out", "val_reward_accuracy")[6] == pytest.approx(accuracy)
    assert abs(val_loss - np.log(2)) > 1e-3  # it moved: the comparison is not of two starting models


def test_stored_reference_log_probs_equal_the_starting_model_on_the_fly(tmp_path, sums, base):
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1")
    stored = torch.load(tmp_path / "out" / dpo.REFERENCE_FILE, weights_only=True)
    reference = GPT.from_pretrained(base).eval()
    for split_name in data.SPLITS:
        split = data.load_pairs(sums, split_name)
        batcher = data.PairBatches(split, 16, shuffle=False)
        with torch.no_grad():
            on_the_fly = torch.stack([plain_answer_log_probs(reference, *map(torch.from_numpy, batcher.batch([i])))
                                      for i in range(split.num_pairs)])
        assert stored[split_name].shape == (split.num_pairs, 2)
        assert torch.allclose(stored[split_name], on_the_fly, atol=1e-5), split_name


def test_a_new_run_reuses_stored_reference_log_probs_only_when_they_fit(tmp_path, sums, base, capsys):
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1")
    path = tmp_path / "out" / dpo.REFERENCE_FILE
    first = path.read_bytes()
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1", "--overwrite", "--learning_rate=1e-3")
    assert "log-probabilities in" in capsys.readouterr().out and path.read_bytes() == first
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1", "--overwrite", "--dtype=bfloat16")
    assert "log-probabilities of 140 train and 40 val pairs" in capsys.readouterr().out
    assert logged(tmp_path / "out", "val_reward_margin")[0] == 0.0  # bf16 too: step 0's policy is its reference


# ----------------------------------------------------------------------------- learning

def test_dpo_learns_an_obvious_preference_on_held_out_questions(tmp_path, sums, base):
    run(tmp_path, sums, base, "--max_iters=200", "--eval_interval=25", "--batch_size=16", "--warmup_iters=10",
        "--min_lr=3e-4", "--log_interval=25")
    accuracy, margin = logged(tmp_path / "out", "val_reward_accuracy"), logged(tmp_path / "out", "val_reward_margin")
    assert accuracy[0] == 0.5 and margin[0] == 0.0  # policy = reference: every reward 0, a tie each
    assert accuracy[200] > 0.9 and margin[200] > 1.0, (accuracy, margin)
    chosen, rejected = logged(tmp_path / "out", "val_chosen_reward"), logged(tmp_path / "out", "val_rejected_reward")
    assert chosen[200] - rejected[200] == pytest.approx(margin[200], abs=1e-4)
    losses = logged(tmp_path / "out", "train_loss")
    assert losses[25] > 0.5 > 0.2 > losses[200]


# ----------------------------------------------------------------------------- resume and DDP

@pytest.mark.parametrize("kind", KINDS)
def test_dpo_resume_is_exact(tmp_path, sums, base, kind):
    common = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", *KINDS[kind]]
    straight = run(tmp_path, sums, base, "--max_iters=8", *common, out="straight")
    run(tmp_path, sums, base, "--max_iters=4", *common, out="resumed")
    resumed = run(tmp_path, sums, base, "--max_iters=8", "--init_from=resume", *common, out="resumed")
    for key in ("train_loss", "train_reward_accuracy", "train_reward_margin", "val_loss"):
        a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
        assert sorted(a) == sorted(b) and len(a) >= 3 and all(abs(a[s] - b[s]) < 1e-6 for s in a), (key, a, b)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_refuses_a_changed_dataset_or_a_missing_reference(tmp_path, sums, base):
    dataset = tmp_path / "sums"
    shutil.copytree(sums, dataset)
    run(tmp_path, dataset, base, "--max_iters=2", "--eval_interval=2")
    write_sums(dataset, seed=1)  # the same pairs, split differently
    with pytest.raises(GrafitoError, match="reference_logps.pt was made from another dataset"):
        run(tmp_path, dataset, base, "--max_iters=4", "--init_from=resume")
    write_sums(dataset)
    (tmp_path / "out" / dpo.REFERENCE_FILE).unlink()
    with pytest.raises(GrafitoError, match="reference_logps.pt is missing"):
        run(tmp_path, dataset, base, "--max_iters=4", "--init_from=resume")


def test_a_resume_keeps_the_runs_reference(tmp_path, sums, base):
    run(tmp_path, sums, base, "--max_iters=2", "--eval_interval=2", *LORA)
    with pytest.raises(GrafitoError, match="different dpo_reference"):
        run(tmp_path, sums, base, "--max_iters=4", "--init_from=resume", *LORA, "--dpo_reference=stored")


def test_an_sft_run_cannot_resume_as_dpo_nor_the_reverse(tmp_path, sums, base, tiny_dataset):
    run(tmp_path, sums, base, "--max_iters=1", "--eval_interval=1")
    with pytest.raises(GrafitoError, match=r"different objective \('dpo' -> 'sft'\)"):
        run(tmp_path, sums, base, "--max_iters=2", "--init_from=resume", "--objective=sft")
    run(tmp_path, tiny_dataset, base, "--max_iters=1", "--eval_interval=1", "--objective=sft", out="sft")
    with pytest.raises(GrafitoError, match=r"different objective \('sft' -> 'dpo'\)"):
        run(tmp_path, tiny_dataset, base, "--max_iters=2", "--init_from=resume", out="sft")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_ddp_two_processes_equal_one_process(tmp_path, sums, base, kind):
    args = [ROOT / "train.py", *TINY, f"--dataset={sums}", f"--init_from={base}", "--max_iters=4", "--eval_interval=4",
            "--gradient_accumulation_steps=2", "--batch_size=4",
            *(LORA + ["--lora_dropout=0"] if kind == "lora" else [])]  # dropout: each rank draws its own masks
    single = run_script(*args, f"--out_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                     f"--out_dir={tmp_path / 'two'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for key in ("train_loss", "train_reward_accuracy", "train_chosen_reward", "val_loss"):
        a, b = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-5 for s in a), (key, a, b)
    assert logged(tmp_path / "one", "train_loss")[4] != logged(tmp_path / "one", "train_loss")[1]


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv,message", [
    (["--objective=ppo"], "objective = 'ppo' is invalid: must be one of sft, dpo"),
    (["--beta=0"], "beta = 0.0 is invalid: must be positive"),
    (["--label_smoothing=0.5"], "label_smoothing = 0.5 is invalid"),
    (["--init_from=scratch"], "init_from = 'scratch' is invalid: must be a model to tune with objective=dpo"),
])
def test_dpo_option_errors_name_the_key(argv, message):
    with pytest.raises(GrafitoError) as err:
        train.check_config(load_config(train.DEFAULTS, TINY + argv))
    assert message in str(err.value)


def test_each_objective_refuses_the_other_kind_of_dataset(tmp_path, sums, base, tiny_dataset):
    with pytest.raises(GrafitoError, match="SFT dataset of conversations, not preference pairs"):
        run(tmp_path, tiny_dataset, base, "--max_iters=1")
    with pytest.raises(GrafitoError, match="preference-pairs dataset"):
        run(tmp_path, sums, base, "--max_iters=1", "--objective=sft")
    with pytest.raises(GrafitoError, match="prepare the pairs with --block_size 4"):
        run(tmp_path, sums, base, "--max_iters=1", "--block_size=4")


def test_the_dpo_config_takes_a_step_on_a_tiny_stand_in(tmp_path, sums, base):
    path = ROOT / "config" / "obsidian_000_dpo.py"
    config = load_config(train.DEFAULTS, [str(path), f"--dataset={sums}", f"--init_from={base}",
                                          f"--out_dir={tmp_path / 'o'}", "--device=cpu", "--dtype=float32",
                                          "--compile=false", "--max_iters=1", "--epochs=0", "--block_size=16",
                                          "--batch_size=2", "--plot=false"])
    assert config["objective"] == "dpo" and config["lora_r"] > 0 and config["dataset"] == str(sums)
    assert load_config(train.DEFAULTS, [str(path)])["init_from"] == "out/obsidian_000"
    train.check_config(config)
    train.train(config)
    assert sorted(logged(tmp_path / "o", "train_loss")) == [1] and (tmp_path / "o" / checkpoint.BEST).is_dir()


# ----------------------------------------------------------------------------- eval.py and bench.py

def test_eval_preference_accuracy_is_summed_and_per_token(tmp_path, base, monkeypatch):
    pairs = [(tokenizer.encode(f"{a}+1="), tokenizer.encode(f" {a + 1}") + [EOT],
              tokenizer.encode(" " + " ".join(["no"] * (a % 3 + 1))) + [EOT]) for a in range(12)]
    too_long = (tokenizer.encode("1+1=" * 40), [EOT], [EOT])  # longer than the model's 64 positions: left out
    data.write_pairs(tmp_path / "prefs", {"train": pairs[:2], "val": pairs + [too_long]}, {"dataset": "prefs"})
    data.write_dataset(tmp_path / "chat", {"train": tokenizer.render_batch([[("hi", "hello")]]),
                                           "val": tokenizer.render_batch([[("hi", "hello")]])}, {"block_size": 16})
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    assert grafito_eval.prepared_datasets("") == ["chat"] and grafito_eval.prepared_datasets("", "pairs") == ["prefs"]
    with pytest.raises(GrafitoError, match="prefs is a pairs dataset; give it in --pairs_datasets"):
        grafito_eval.prepared_datasets("prefs")
    config = {**grafito_eval.DEFAULTS, "device": "cpu", "dtype": "float32", "max_new_tokens": 2, "batch_size": 5}
    result = grafito_eval.evaluate_model("tiny", base, config, ["hi"], [], ["chat"], ["prefs"])["preference"]["prefs"]
    model = GPT.from_pretrained(base).eval()
    batcher = data.PairBatches(data.load_pairs("prefs", "val"), 400, shuffle=False)
    summed, per_token = [], []
    with torch.no_grad():
        for i in range(len(pairs)):
            x, y = map(torch.from_numpy, batcher.batch([i]))
            log_probs, lengths = plain_answer_log_probs(model, x, y), (y >= 0).sum(1)
            summed.append(float(log_probs[0] > log_probs[1]))
            per_token.append(float(log_probs[0] / lengths[0] > log_probs[1] / lengths[1]))
    assert result["pairs"] == 12 and result["longer_than_context"] == 1
    assert result["accuracy"] == pytest.approx(np.mean(summed))
    assert result["accuracy_per_token"] == pytest.approx(np.mean(per_token))
    assert np.mean(summed) != np.mean(per_token)  # the answers' lengths differ: the two measures do too
    table = grafito_eval.metrics_table([{"label": "tiny", "val": {}, "preference": {"prefs": result}}], [], ["prefs"])
    assert "prefs preference accuracy (summed / per token)" in table and f"{result['accuracy']:.1%} /" in table


def test_bench_dpo_rows(tmp_path):
    result = run_script(ROOT / "bench.py", "--rows=dpo", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
                        "--batch_size=2", "--repeats=2", "--warmup=1", "--lora_r=4", "--dtype=float32",
                        f"--pairs_dataset={tmp_path / 'none'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {r["row"]: r for r in report["rows"]}
    for name in ("train LoRA, DPO", "train LoRA, DPO, stored reference", "train LoRA, SFT on the same rows",
                 "train full, DPO", "train full, SFT on the same rows"):
        assert rows[name]["tokens_per_s"] > 0 and "2 pairs" in rows[name]["batch"], name
    assert rows["train LoRA, DPO"]["dpo_cost_vs_sft"] > 0 and rows["train full, DPO"]["dpo_cost_vs_sft"] > 0
