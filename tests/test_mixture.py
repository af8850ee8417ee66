"""Several datasets in one run (dataset="a,b", dataset_weights): items drawn in proportion, each
dataset keeping its own position, batches assembled as each dataset's own, a val loss per
dataset and their weighted mean deciding best/, exact resume (SFT and DPO)."""

import json

import numpy as np
import pytest
import torch

import data
import tokenizer
import train
from common import GrafitoError
from test_dpo import write_sums

TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=4",
        "--device=cpu", "--dtype=float32", "--plot=false", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """A second chat dataset, unlike grafito-25k: 'what is a+b' answered with the sum."""
    turns = [[(f"what is {a}+{b}", str(a + b))] for a in range(30) for b in range(10)]
    rendered = tokenizer.render_batch(turns)
    folder = tmp_path_factory.mktemp("data") / "arithmetic"
    data.write_dataset(folder, {"train": rendered[:260], "val": rendered[260:]}, {"dataset": "arithmetic",
                                                                                  "vocab_size": 50257})
    return folder


def run(tmp_path, datasets, *overrides, out="out"):
    config = train.load_train_config(TINY + [f"--dataset={','.join(map(str, datasets))}",
                                             f"--out_dir={tmp_path / out}", *overrides])
    train.check_config(config)
    return train.train(config)


def logged(out_dir, key):
    return {r["step"]: r[key] for r in map(json.loads, open(out_dir / "log.jsonl")) if key in r}


def test_items_come_in_proportion_and_each_dataset_keeps_its_own_order(tiny_dataset, arithmetic):
    alone = [data.PackedBatches(data.load_split(d, "train"), 128, seed=7) for d in (tiny_dataset, arithmetic)]
    mixed = data.Mixture([data.PackedBatches(data.load_split(d, "train"), 128, seed=7)
                          for d in (tiny_dataset, arithmetic)], [3, 1], seed=1)
    items = mixed.next_items(400) + mixed.next_items(400)
    share = np.mean([d == 0 for d, _ in items])
    assert 0.70 < share < 0.80
    for d in (0, 1):
        own = [item for dataset, item in items if dataset == d]
        assert own == alone[d].next_rows(len(own))  # into later epochs too: each counts its own


def test_a_mixed_batch_holds_each_datasets_own_rows_in_item_order(tiny_dataset, arithmetic):
    samplers = [data.PackedBatches(data.load_split(d, "train"), 128, seed=7) for d in (tiny_dataset, arithmetic)]
    mixed = data.Mixture(samplers, [1, 1], seed=2)
    items = mixed.next_items(6)
    x, y = mixed.batch(items)
    for row, (d, item) in enumerate(items):
        own_x, own_y = samplers[d].batch([item])
        assert (x[row] == own_x[0]).all() and (y[row] == own_y[0]).all()


def test_mixed_pairs_keep_chosen_rows_first_and_pad_without_changing_a_row(tmp_path):
    for seed, name in ((0, "sums"), (1, "sums_again")):
        write_sums(tmp_path / name, seed=seed)
    splits = [data.load_pairs(tmp_path / name, "train") for name in ("sums", "sums_again")]
    samplers = [data.PairBatches(split, 16, seed=3, pad_multiple=4) for split in splits]
    mixed = data.Mixture(samplers, [1, 1], seed=4)
    items = mixed.next_items(8)
    x, y = mixed.batch(items)
    n = len(items)
    for row, (d, pair) in enumerate(items):
        own_x, own_y = samplers[d].batch([pair])
        width = own_x.shape[1]
        for half in (0, 1):  # the chosen row in the first half, the rejected row in the second
            assert (x[row + half * n, :width] == own_x[half]).all() and (y[row + half * n, :width] == own_y[half]).all()
            assert (y[row + half * n, width:] == -1).all()


def test_a_mixture_logs_each_datasets_val_loss_and_best_follows_their_weighted_mean(tmp_path, tiny_dataset,
                                                                                  arithmetic):
    run(tmp_path, [tiny_dataset, arithmetic], "--dataset_weights=3,1", "--max_iters=4", "--eval_interval=4")
    out = tmp_path / "out"
    a, b = logged(out, f"val_loss_{tiny_dataset.name}"), logged(out, f"val_loss_{arithmetic.name}")
    mean = logged(out, "val_loss")
    assert sorted(mean) == [0, 4] and a[4] != b[4]
    assert mean[4] == pytest.approx(0.75 * a[4] + 0.25 * b[4])
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)
    assert state["best_val"] == pytest.approx(mean[4])


def test_mixture_resume_is_exact(tmp_path, tiny_dataset, arithmetic):
    common = ["--dataset_weights=1,2", "--lr_decay_iters=6", "--eval_interval=3", "--dropout=0.1"]
    straight = run(tmp_path, [tiny_dataset, arithmetic], "--max_iters=6", *common, out="straight")
    run(tmp_path, [tiny_dataset, arithmetic], "--max_iters=3", *common, out="resumed")
    resumed = run(tmp_path, [tiny_dataset, arithmetic], "--max_iters=6", "--init_from=resume", *common, out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dpo_on_a_mixture_of_pairs_datasets_resumes_exactly(tmp_path, kind):
    """Full fine-tuning stores each dataset's reference log-probabilities; LoRA switches its adapters off."""
    from conftest import random_gpt_folder

    for seed, name in ((0, "sums"), (1, "sums_again")):
        write_sums(tmp_path / name, seed=seed)
    base = random_gpt_folder(tmp_path / "base", n_embd=32, block_size=64)
    datasets = [tmp_path / "sums", tmp_path / "sums_again"]
    common = ["--objective=dpo", f"--init_from={base}", "--block_size=16", "--batch_size=8", "--beta=0.5",
              "--eval_interval=3", "--lr_decay_iters=6", *(["--lora_r=4"] if kind == "lora" else [])]
    run(tmp_path, datasets, "--max_iters=6", *common, out="straight")
    run(tmp_path, datasets, "--max_iters=3", *common, out="resumed")
    run(tmp_path, datasets, "--max_iters=6", *common, "--init_from=resume", out="resumed")
    for key in ("train_loss", "val_loss", "val_loss_sums", "val_loss_sums_again"):
        a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
        assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-6 for s in a), (key, a, b)
    val = logged(tmp_path / "straight", "val_loss")
    assert val[0] == pytest.approx(np.log(2), abs=1e-6)  # each dataset's reference is its own start


@pytest.mark.parametrize("weights,message", [("3", "2 positive numbers, one per dataset"),
                                             ("1,-1", "2 positive numbers"), ("a,b", "2 positive numbers")])
def test_weights_that_do_not_fit_the_datasets_are_refused_before_any_work(tmp_path, tiny_dataset, arithmetic,
                                                                         weights, message):
    config = train.load_train_config(TINY + [f"--dataset={tiny_dataset},{arithmetic}", f"--dataset_weights={weights}",
                                             f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(GrafitoError, match=message):
        train.check_config(config)


def test_a_mixture_of_kinds_is_refused(tmp_path, tiny_dataset):
    write_sums(tmp_path / "sums")
    with pytest.raises(GrafitoError, match="preference-pairs dataset"):
        run(tmp_path, [tiny_dataset, tmp_path / "sums"], "--max_iters=1")
