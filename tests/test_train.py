"""train.py: masked SFT learns, resume is exact, DDP equals one process, LoRA, configs, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import data
import lora
import tokenizer
import train
from common import GrafitoError
from configurator import load_config, read_config_file
from conftest import GRAFITO_25K, ROOT
from model import GPT, GPTConfig

TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=4",
        "--device=cpu", "--dtype=float32", "--plot=false", "--log_interval=1", "--warmup_iters=2"]


def prepare_head(folder, n_train, n_val):
    """The first real grafito-25k conversations, prepared in the standard format."""
    sys.path.insert(0, str(ROOT / "prepare"))
    import grafito25k
    import pipeline

    if not GRAFITO_25K.exists():
        pytest.skip("../shared data not present")
    text = "\n\n\n".join(GRAFITO_25K.read_text(encoding="utf-8").split("\n\n\n")[:n_train + n_val + 10])
    report = pipeline.Report("grafito-25k head")
    kept = pipeline.clean_records(grafito25k.parse(text, report), report, detokenize=True)
    rendered = tokenizer.render_batch([r.turns for r in kept])
    data.write_dataset(folder, {"train": rendered[:n_train], "val": rendered[n_train:n_train + n_val]},
                       {"dataset": folder.name, "vocab_size": 50257})
    return folder


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return prepare_head(tmp_path_factory.mktemp("data") / "tiny", 100, 20)


@pytest.fixture(scope="module")
def handful(tmp_path_factory):
    return prepare_head(tmp_path_factory.mktemp("data") / "handful", 12, 4)


def run(tmp_path, dataset, *overrides, out="out"):
    config = load_config(train.DEFAULTS, TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / out}", *overrides])
    train.validate(config)
    trainer = train.Trainer(config)
    trainer.run()
    return trainer


def logged(out_dir, key):
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}


def test_tiny_model_overfits_a_handful_of_real_conversations(tmp_path, handful):
    run(tmp_path, handful, "--max_iters=80", "--eval_interval=80", "--learning_rate=5e-3", "--min_lr=5e-4",
        "--batch_size=2")
    losses = logged(tmp_path / "out", "train_loss")
    start, end = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (78, 79, 80)])
    assert start > 10 and end < 0.25 * start, (start, end)


def test_packed_rows_hold_whole_conversations_and_shifted_masks(tiny_dataset):
    split = data.load_split(tiny_dataset, "train")
    batches = data.PackedBatches(split, 128, seed=3)
    rows = batches.rows_of_epoch(0)
    assert sorted(i for row in rows for i in row) == list(range(split.num_conversations))  # each once per epoch
    for row in rows:
        assert sum(min(split.lengths[i], 129) for i in row) <= 129 or len(row) == 1
    x, y = batches.batch(rows[:4])
    for r, row in enumerate(rows[:4]):
        tokens = np.concatenate([split.conversation(i)[0] for i in row])[:129]
        mask = np.concatenate([split.conversation(i)[1] for i in row])[:129]
        n = len(tokens)
        assert (x[r, :min(n, 128)] == tokens[:128]).all()
        expected_y = np.where(mask[1:], tokens[1:], -1)
        assert (y[r, :n - 1] == expected_y).all() and (y[r, n - 1:] == -1).all()
    assert batches.rows_of_epoch(1) != rows  # a new order each epoch
    cut, cut_tokens = data.PackedBatches(split, 48).overlong()  # reported by train.py: what the row end cuts off
    long = [n for n in split.lengths if n > 49]
    assert cut == len(long) > 0 and cut_tokens == sum(n - 49 for n in long)


@pytest.mark.parametrize("bias", ["true", "false"])  # false: the checkpoint's zero biases must be left out again
def test_resume_is_exact(tmp_path, tiny_dataset, bias):
    common = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", "--learning_rate=1e-3", f"--bias={bias}"]
    straight = run(tmp_path, tiny_dataset, "--max_iters=8", *common, out="straight")
    run(tmp_path, tiny_dataset, "--max_iters=4", *common, out="resumed")
    resumed = run(tmp_path, tiny_dataset, "--max_iters=8", "--init_from=resume", *common, out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    for (name, p), (_, q) in zip(straight.raw_model.named_parameters(), resumed.raw_model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_refuses_a_changed_batch_and_a_missing_checkpoint(tmp_path, tiny_dataset):
    with pytest.raises(GrafitoError, match="cannot resume.*not found"):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=2")
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(GrafitoError, match=r"batch_size \(4 -> 2\)"):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=4", "--batch_size=2")
    # saved by 2 processes with accumulation rounded up to 2: one process would take 1 micro-batch per step
    state_path = tmp_path / "out" / checkpoint.LATEST / checkpoint.TRAIN_STATE
    state = torch.load(state_path, weights_only=True)
    assert (state["accumulation"], state["world"]) == (1, 1)
    state.update(accumulation=2, world=2)
    torch.save(state, state_path)
    with pytest.raises(GrafitoError, match="took 2 micro-batches per step over 2 process.*Resume with 2"):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=4")


def test_new_run_never_replaces_an_old_one_silently_and_logs_each_step_once(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    best = (tmp_path / "out" / checkpoint.BEST / "model.safetensors").read_bytes()
    with pytest.raises(GrafitoError, match="already holds a run.*init_from=resume.*--overwrite"):
        run(tmp_path, tiny_dataset, "--max_iters=1", "--eval_interval=1", "--seed=2")
    assert (tmp_path / "out" / checkpoint.BEST / "model.safetensors").read_bytes() == best
    with open(tmp_path / "out" / "log.jsonl", "a") as log:  # steps 3-4 ran, then an interruption before a save
        log.write(json.dumps({"step": 3, "train_loss": 99.0}) + "\n" + json.dumps({"step": 4, "train_loss": 99.0}) + "\n")
        log.write('{"step": 5, "train_lo')  # the crash cut this line short
    run(tmp_path, tiny_dataset, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "out" / "log.jsonl") if "train_loss" in line]
    assert steps == [1, 2, 3, 4] and 99.0 not in logged(tmp_path / "out", "train_loss").values()
    (tmp_path / "out" / checkpoint.MERGED).mkdir()  # as an earlier LoRA run with lora_merge would leave it
    run(tmp_path, tiny_dataset, "--max_iters=1", "--eval_interval=1", "--overwrite")  # a new run: a new log
    assert sorted(logged(tmp_path / "out", "train_loss")) == [1]
    assert not (tmp_path / "out" / checkpoint.MERGED).exists()


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_dataset):
    args = [str(ROOT / "train.py"), *TINY, f"--dataset={tiny_dataset}", "--max_iters=4", "--eval_interval=4",
            "--gradient_accumulation_steps=2", "--batch_size=2", "--learning_rate=1e-3"]
    single = subprocess.run([sys.executable, *args, f"--out_dir={tmp_path / 'one'}"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          f"--out_dir={tmp_path / 'two'}"], capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = logged(tmp_path / "one", "train_loss"), logged(tmp_path / "two", "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_ddp_stops_every_rank_when_rank_0_fails_to_save(tmp_path, tiny_dataset):
    """Only rank 0 saves; when that fails the other rank stops with a message saying why."""
    out = tmp_path / "out"
    common = ["--eval_interval=2", "--gradient_accumulation_steps=2", "--batch_size=2"]
    run(tmp_path, tiny_dataset, "--max_iters=2", *common)
    (out / "ckpt.old").write_text("a file where the previous ckpt/ is parked: the next save's swap fails")
    args = [str(ROOT / "train.py"), *TINY, f"--dataset={tiny_dataset}", "--max_iters=4", *common, f"--out_dir={out}",
            "--init_from=resume"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode != 0
    assert "rank 1: stopping, rank 0 failed" in ddp.stdout + ddp.stderr


def test_accumulation_rounds_up_to_the_process_count():
    """The codename configs say gradient_accumulation_steps=1; under torchrun each process needs one."""
    from types import SimpleNamespace

    def steps(world, **config):
        config = {"tokens_per_step": 0, "gradient_accumulation_steps": 1, "batch_size": 4, "block_size": 128, **config}
        return train.Trainer._accumulation_steps(SimpleNamespace(config=config, world=world, master=False))

    assert steps(1) == 1 and steps(8) == 8 and steps(2, gradient_accumulation_steps=6) == 6
    assert steps(4, gradient_accumulation_steps=6) == 8
    assert steps(1, tokens_per_step=4 * 128 * 3 + 1) == 4 and steps(2, tokens_per_step=4 * 128 * 3) == 4


@pytest.fixture
def tiny_pretrained(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_lora_run_trains_adapters_only_and_resumes(tmp_path, tiny_dataset, tiny_pretrained):
    args = [f"--init_from={tiny_pretrained}", "--lora_r=4", "--lora_targets=q,v,mlp_fc", "--learning_rate=5e-3",
            "--lr_decay_iters=6", "--eval_interval=3", "--lora_merge=true"]
    trainer = run(tmp_path, tiny_dataset, "--max_iters=6", *args, out="lora")
    base = GPT.from_pretrained(tiny_pretrained)
    trained = dict(trainer.raw_model.named_parameters())
    for name, param in base.named_parameters():  # the adapters were merged into a fresh copy, not this one
        assert torch.equal(param, trained[name]), name
    ckpt = tmp_path / "lora" / checkpoint.LATEST
    adapter_bytes = (ckpt / lora.ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < 0.1 * (tiny_pretrained / "model.safetensors").stat().st_size
    assert not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())["base_model"] == str(tiny_pretrained.resolve())
    # the frozen base is untouched: the adapter re-applied to a fresh base equals the merged export
    merged = GPT.from_pretrained(tmp_path / "lora" / checkpoint.MERGED).eval()
    reloaded = checkpoint.load_model(tmp_path / "lora").eval()
    idx = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(merged(idx)[0], reloaded(idx)[0], atol=1e-5)
    losses = logged(tmp_path / "lora", "train_loss")
    assert losses[6] < losses[1]
    run(tmp_path, tiny_dataset, "--max_iters=3", *args, out="lora_resumed")
    run(tmp_path, tiny_dataset, "--max_iters=6", *args, "--init_from=resume", out="lora_resumed")
    again = logged(tmp_path / "lora_resumed", "train_loss")
    assert all(abs(losses[s] - again[s]) < 1e-6 for s in losses)
    # a new adapter on top of this run: its base is the first run's best/, itself an adapter
    second = run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2", f"--init_from={tmp_path / 'lora'}",
                 *args[1:], out="lora_on_lora")
    assert second.base_model == str((tmp_path / "lora" / checkpoint.BEST).resolve())
    lora.merge_lora(second.raw_model)
    chained = checkpoint.load_model(tmp_path / "lora_on_lora").eval()
    assert torch.allclose(second.raw_model.eval()(idx)[0], chained(idx)[0], atol=1e-5)
    with pytest.raises(GrafitoError, match="would overwrite the weights it starts from"):
        run(tmp_path, tiny_dataset, "--max_iters=1", f"--init_from={tmp_path / 'lora'}", *args[1:], "--overwrite",
            out="lora")
    # the first run's best/ changes (retrained): the chained adapter's base is no longer what it learned on
    first = checkpoint.load_weights(tmp_path / "lora" / checkpoint.BEST, merge=False)
    with torch.no_grad():
        lora.lora_layers(first)[0].lora_B.add_(0.01)
    checkpoint.save_checkpoint(tmp_path / "lora", checkpoint.BEST, first, str(tiny_pretrained.resolve()))
    with pytest.raises(GrafitoError, match="has changed since the adapter was trained"):
        checkpoint.load_model(tmp_path / "lora_on_lora")
    # an adapter naming itself as its base (hand-edited) is an error, not endless recursion
    looped = tmp_path / "lora_on_lora" / checkpoint.BEST
    meta = json.loads((looped / lora.ADAPTER_CONFIG).read_text())
    (looped / lora.ADAPTER_CONFIG).write_text(json.dumps({**meta, "base_model": str(looped)}))
    with pytest.raises(GrafitoError, match="loops back to itself"):
        checkpoint.load_model(looped)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    saved = (tmp_path / "out" / checkpoint.LATEST / "model.safetensors").read_bytes()
    real_step = train.Trainer.train_step

    def poisoned(self):
        loss_sum, supervised = real_step(self)
        return loss_sum * float("nan"), supervised

    monkeypatch.setattr(train.Trainer, "train_step", poisoned)
    with pytest.raises(GrafitoError, match="loss became nan by step 3.*untouched"):
        run(tmp_path, tiny_dataset, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert (tmp_path / "out" / checkpoint.LATEST / "model.safetensors").read_bytes() == saved


@pytest.mark.parametrize("argv,message", [
    (["--batch_size=0"], "batch_size = 0 is invalid"),
    (["--learning_rate=-1"], "learning_rate = -1.0 is invalid"),
    (["--bacth_size=2"], "unknown option --bacth_size (did you mean batch_size?)"),
    (["--max_iters=ten"], "--max_iters='ten': expected int"),
    (["--init_from=gpt2", "--lora_r=4", "--lora_targets=q,query"], "lora targets"),
    (["--lora_r=4"], "LoRA adapts a pretrained model"),
    (["--out_dir="], "out_dir = '' is invalid: must not be empty"),
    ([f"--out_dir={ROOT / 'README.md'}"], "is a file, not a folder"),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(GrafitoError) as err:
        train.validate(load_config(train.DEFAULTS, TINY + argv))
    assert message in str(err.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1e-4\nbatchsize = 4\n")
    with pytest.raises(GrafitoError, match="unknown config key 'batchsize'"):
        load_config(train.DEFAULTS, [str(bad)])
    bad.write_text("max_iters = 1.5\n")
    with pytest.raises(GrafitoError, match="max_iters = 1.5 should be a int"):
        load_config(train.DEFAULTS, [str(bad)])
    config = load_config(train.DEFAULTS, [str(ROOT / "config" / "ruby_002.py"), "--max_iters", "20", "--compile"])
    assert config["max_iters"] == 20 and config["compile"] is True and config["learning_rate"] == 1e-4
    # obsidian-000 says epochs = 2; a later --max_iters (a quick trial) wins, and the other way round
    obsidian = str(ROOT / "config" / "obsidian_000.py")
    config = train.load_train_config([obsidian, "--max_iters=20"])
    assert (config["epochs"], config["max_iters"]) == (0.0, 20)
    config = train.load_train_config([obsidian, "--max_iters=20", "--epochs=1"])
    assert (config["epochs"], config["max_iters"]) == (1.0, train.DEFAULTS["max_iters"])
    config = train.load_train_config([str(ROOT / "config" / "cpu_tiny.py"), "--epochs=0"])  # 0: not by epochs
    assert (config["epochs"], config["max_iters"]) == (0.0, 300)
    bad.write_text("epochs = 2.0\nmax_iters = 50\n")
    with pytest.raises(GrafitoError, match="sets both epochs and max_iters"):
        train.load_train_config([str(bad)])


def test_block_size_larger_than_the_model_and_cli_errors(tmp_path, tiny_dataset, tiny_pretrained):
    with pytest.raises(GrafitoError, match="block_size = 256 is larger than the model's context"):
        run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--block_size=256", "--max_iters=1")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--batch_size=0"], capture_output=True, text=True)
    assert result.returncode == 2 and "batch_size = 0 is invalid" in result.stderr and "Traceback" not in result.stderr


ORIGINAL_TABLE = {  # the original README's model table
    "obsidian_000.py": dict(block_size=512, epochs=2.0, learning_rate=5e-4, dataset="hh_rlhf"),
    "ruby_002.py": dict(init_from="gpt2", block_size=1024, max_iters=1000, learning_rate=1e-4, dataset="grafito25k"),
    "lazuli_001.py": dict(init_from="gpt2-medium"), "diamond_001.py": dict(init_from="gpt2-large"),
    "emerald_003.py": dict(init_from="gpt2-xl"), "cpu_tiny.py": dict(init_from="scratch"),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_TABLE))
def test_every_config_takes_a_step_on_a_tiny_stand_in(name, tmp_path, tiny_dataset, tiny_pretrained):
    path = ROOT / "config" / name
    values = read_config_file(path)
    assert {k: values[k] for k in ORIGINAL_TABLE[name]} == ORIGINAL_TABLE[name]
    stand_in = [] if values["init_from"] == "scratch" else [f"--init_from={tiny_pretrained}"]
    config = load_config(train.DEFAULTS, [str(path), f"--dataset={tiny_dataset}", f"--out_dir={tmp_path / 'o'}",
                                          "--device=cpu", "--dtype=float32", "--compile=false", "--max_iters=1",
                                          "--epochs=0", "--block_size=64", "--batch_size=2", "--plot=false", *stand_in])
    train.validate(config)
    trainer = train.Trainer(config)
    trainer.run()
    assert trainer.step == 1 and (tmp_path / "o" / checkpoint.BEST).is_dir()


def test_a_dataset_without_val_split_still_trains_and_saves(tmp_path, tmp_path_factory):
    no_val = prepare_head(tmp_path_factory.mktemp("data") / "noval", 10, 0)
    trainer = run(tmp_path, no_val, "--max_iters=2", "--eval_interval=1")
    assert trainer.step == 2 and (tmp_path / "out" / checkpoint.BEST / "model.safetensors").exists()
    assert not logged(tmp_path / "out", "val_loss")
