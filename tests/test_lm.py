"""objective=lm and the text dataset format: random windows of the shards, exact resume,
next-token loss on every token equal to a plain computation, the kinds kept apart."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import tokenizer
import train
from common import GrafitoError
from conftest import ROOT, SHARED

BROWN = SHARED / "data" / "brown" / "brown.jsonl.gz"
TINY = ["--objective=lm", "--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64",
        "--batch_size=4", "--device=cpu", "--dtype=float32", "--plot=false", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--eval_iters=4"]


def brown_documents(count):
    if not BROWN.exists():
        pytest.skip("../shared data not present")
    with gzip.open(BROWN, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(count), f)]
    return [tokenizer.encode(text) + [tokenizer.EOT] for text in texts]


@pytest.fixture(scope="module")
def brown(tmp_path_factory):
    """The first 12 Brown Corpus documents: train in two shards, val in one."""
    documents = brown_documents(12)
    folder = tmp_path_factory.mktemp("data") / "brown"
    data.write_text_dataset(folder, {"train": [documents[:5], documents[5:10]], "val": [documents[10:]]},
                            {"dataset": "brown", "vocab_size": 50257})
    return folder


def run(tmp_path, dataset, *overrides, out="out"):
    config = train.load_train_config(TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / out}", *overrides])
    train.check_config(config)
    return train.train(config)


def logged(out_dir, key):
    return {r["step"]: r[key] for r in map(json.loads, open(out_dir / "log.jsonl")) if key in r}


def test_shards_hold_the_documents_each_followed_by_end_of_text(brown):
    documents = brown_documents(12)
    split = data.load_text(brown, "train")
    assert len(split.shards) == 2 and split.documents == 10
    assert np.concatenate(split.shards).tolist() == [t for doc in documents[:10] for t in doc]
    assert split.max_token_id == max(max(doc) for doc in documents[:10])


def test_windows_are_consecutive_tokens_inside_one_shard(brown):
    split = data.load_text(brown, "train")
    sampler = data.TextWindows(split, 64, seed=3)
    windows = sampler.next_windows(500)
    x, y = sampler.batch(windows[:8])
    for (shard, offset), row_x, row_y in zip(windows, x, y):
        tokens = split.shards[shard][offset:offset + 65].tolist()
        assert row_x.tolist() == tokens[:-1] and row_y.tolist() == tokens[1:]
    assert all(0 <= offset <= len(split.shards[shard]) - 65 for shard, offset in windows)
    share = np.mean([shard for shard, _ in windows])  # each start equally likely: shards by their number of starts
    expected = (len(split.shards[1]) - 64) / sum(len(s) - 64 for s in split.shards)
    assert abs(share - expected) < 0.08


def test_a_restored_position_continues_the_same_windows(brown):
    split = data.load_text(brown, "train")
    straight = data.TextWindows(split, 64, seed=5)
    first, second = straight.next_windows(6), straight.next_windows(6)
    resumed = data.TextWindows(split, 64, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(data.TextWindows(split, 64, seed=5).state_dict())))
    resumed.next_windows(6)
    assert resumed.next_windows(6) == second != first
    assert data.TextWindows(split, 64, seed=6).next_windows(6) != first


def test_lm_training_lowers_the_loss_and_logs_a_plain_val_loss(tmp_path, brown):
    model = run(tmp_path, brown, "--max_iters=30", "--eval_interval=30")
    losses = logged(tmp_path / "out", "train_loss")
    assert losses[30] < 0.8 * losses[1]
    # the logged val loss: every token of the first 4 batches of consecutive val windows, full logits
    val = data.load_text(brown, "val")
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in list(data.TextEvalBatches(val, 64, 4))[:4]:
            logits, _ = model(torch.from_numpy(x))
            total += F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten(), reduction="sum").item()
            count += y.size
    assert logged(tmp_path / "out", "val_loss")[30] == pytest.approx(total / count, rel=1e-5)
    # eval.py measures a text dataset's val loss the same way
    result = subprocess.run([sys.executable, ROOT / "eval.py", f"--models=native={tmp_path / 'out'}",
                             f"--out={tmp_path / 'eval.md'}", f"--datasets={brown}", "--pairs_datasets=",
                             "--accuracy_samples=0", "--eval_iters=4", "--batch_size=4", "--dtype=float32",
                             "--max_new_tokens=2", "--device=cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads((tmp_path / "eval.json").read_text())["results"][0]["val"][str(brown)]
    assert measured["loss"] == pytest.approx(total / count, rel=1e-5) and measured["tokens"] == count


def test_lm_resume_is_exact(tmp_path, brown):
    common = ["--lr_decay_iters=6", "--eval_interval=3", "--dropout=0.1"]
    straight = run(tmp_path, brown, "--max_iters=6", *common, out="straight")
    run(tmp_path, brown, "--max_iters=3", *common, out="resumed")
    resumed = run(tmp_path, brown, "--max_iters=6", "--init_from=resume", *common, out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_native_model_is_a_base_like_any_other(tmp_path, brown, tiny_dataset):
    """Pretrained with objective=lm, then fine-tuned on chat data (SFT) from its out_dir."""
    run(tmp_path, brown, "--max_iters=2", "--eval_interval=2", "--block_size=128", out="native")
    config = train.load_train_config([f"--init_from={tmp_path / 'native'}", f"--dataset={tiny_dataset}",
                                      f"--out_dir={tmp_path / 'chat'}", "--max_iters=2", "--eval_interval=2",
                                      "--block_size=128", "--batch_size=2", "--device=cpu", "--dtype=float32",
                                      "--plot=false"])
    train.check_config(config)
    train.train(config)
    assert checkpoint.load_model(tmp_path / "chat").config.n_embd == 64


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_the_other_objectives_refuse_a_text_dataset(tmp_path, brown, tiny_pretrained, objective):
    with pytest.raises(GrafitoError, match="is a text dataset; a text dataset trains with objective=lm"):
        run(tmp_path, brown, f"--objective={objective}", f"--init_from={tiny_pretrained}", "--max_iters=1")


def test_lm_refuses_a_chat_dataset(tmp_path, tiny_dataset):
    with pytest.raises(GrafitoError, match="is a sft dataset; objective=lm trains on text datasets"):
        run(tmp_path, tiny_dataset, "--max_iters=1")


def test_a_damaged_shard_is_named(tmp_path, brown):
    import shutil

    copy = tmp_path / "brown"
    shutil.copytree(brown, copy)
    with open(copy / "train-00001.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(GrafitoError, match=r"train-00001.bin holds .* bytes, meta.json says .* tokens"):
        data.load_text(copy, "train")
    (copy / "train-00001.bin").unlink()
    with pytest.raises(GrafitoError, match="train-00001.bin is missing"):
        data.load_text(copy, "train")


def test_a_corpus_shorter_than_a_window_is_a_clear_error(tmp_path):
    data.write_text_dataset(tmp_path / "short", {"train": [[[1, 2, 3, tokenizer.EOT]]], "val": []},
                            {"dataset": "short", "vocab_size": 50257})
    with pytest.raises(GrafitoError, match="no shard of more than block_size = 64 tokens"):
        data.TextWindows(data.load_text(tmp_path / "short", "train"), 64)


NATIVE = {"native_124m.py": {"n_layer": 12, "n_embd": 768, "tokens_per_step": 524_288, "learning_rate": 6e-4,
                             "min_lr": 6e-5, "warmup_iters": 715, "max_iters": 19_073, "weight_decay": 0.1,
                             "beta2": 0.95},
          "native_cpu.py": {"device": "cpu", "block_size": 1024}}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_the_native_configs_take_a_step_on_a_tiny_stand_in(name, tmp_path, brown):
    from configurator import load_config, read_config_file

    path = ROOT / "config" / name
    values = read_config_file(path)
    assert values["objective"] == "lm" and values["init_from"] == "scratch"
    assert {k: values[k] for k in NATIVE[name]} == NATIVE[name]
    config = load_config(train.DEFAULTS, [str(path), f"--dataset={brown}", f"--out_dir={tmp_path / 'o'}",
                                          "--device=cpu", "--dtype=float32", "--compile=false", "--max_iters=1",
                                          "--tokens_per_step=0", "--n_layer=1", "--n_embd=32", "--n_head=2",
                                          "--block_size=64", "--batch_size=2", "--plot=false", "--eval_iters=1"])
    train.check_config(config)
    train.train(config)
    assert sorted(logged(tmp_path / "o", "train_loss")) == [1]
