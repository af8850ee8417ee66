"""train.py: masked SFT learns, resume is exact, DDP equals one process, LoRA runs, options are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import lora
import loss
import train
from common import GrafitoError
from configurator import load_config, read_config_file
from conftest import ROOT, prepare_head
from model import GPT, GPTConfig

TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=4",
        "--device=cpu", "--dtype=float32", "--plot=false", "--log_interval=1", "--warmup_iters=2"]


def config_for(tmp_path, dataset, *overrides, out="out"):
    config = train.load_train_config(TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / out}", *overrides])
    train.check_config(config)
    return config


def run(tmp_path, dataset, *overrides, out="out"):
    """Train in this process; returns the trained model."""
    return train.train(config_for(tmp_path, dataset, *overrides, out=out))


def logged(out_dir, key):
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def handful(tmp_path_factory):
    return prepare_head(tmp_path_factory.mktemp("data") / "handful", 12, 4)


def test_tiny_model_overfits_a_handful_of_real_conversations(tmp_path, handful):
    run(tmp_path, handful, "--max_iters=80", "--eval_interval=80", "--learning_rate=5e-3", "--min_lr=5e-4",
        "--batch_size=2")
    losses = logged(tmp_path / "out", "train_loss")
    start, end = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (78, 79, 80)])
    assert start > 10 and end < 0.25 * start, (start, end)


@pytest.mark.parametrize("bias", ["true", "false"])  # false: the checkpoint's zero biases must be left out again
def test_resume_is_exact(tmp_path, tiny_dataset, bias):
    common = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", "--learning_rate=1e-3", f"--bias={bias}"]
    straight = run(tmp_path, tiny_dataset, "--max_iters=8", *common, out="straight")
    run(tmp_path, tiny_dataset, "--max_iters=4", *common, out="resumed")
    resumed = run(tmp_path, tiny_dataset, "--max_iters=8", "--init_from=resume", *common, out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_dataset):
    with pytest.raises(GrafitoError, match="cannot resume.*not found"):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=2")


@pytest.mark.parametrize("change,message", [("--batch_size=2", r"batch_size \(4 -> 2\)"),
                                            ("--dtype=bfloat16", r"dtype \('float32' -> 'bfloat16'\)")])
def test_resume_refuses_settings_that_change_the_run(tmp_path, tiny_dataset, change, message):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    with pytest.raises(GrafitoError, match=message):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=4", change)


def test_resume_refuses_another_process_count(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    state_path = tmp_path / "out" / checkpoint.LATEST / checkpoint.TRAIN_STATE
    state = torch.load(state_path, weights_only=True)
    assert (state["accumulation"], state["world"]) == (1, 1)
    state.update(accumulation=2, world=2)  # as 2 processes with accumulation rounded up to 2 would save it
    torch.save(state, state_path)
    with pytest.raises(GrafitoError, match="took 2 micro-batches per step over 2 process.*Resume with 2"):
        run(tmp_path, tiny_dataset, "--init_from=resume", "--max_iters=4")


def test_a_new_run_into_an_out_dir_holding_one_is_refused(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    best = (tmp_path / "out" / checkpoint.BEST / "model.safetensors").read_bytes()
    with pytest.raises(GrafitoError, match="already holds a run.*init_from=resume.*--overwrite"):
        run(tmp_path, tiny_dataset, "--max_iters=1", "--eval_interval=1", "--seed=2")
    assert (tmp_path / "out" / checkpoint.BEST / "model.safetensors").read_bytes() == best


def test_overwrite_starts_afresh_and_removes_the_old_runs_files(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    (tmp_path / "out" / checkpoint.MERGED).mkdir()  # as an earlier LoRA run with lora_merge would leave it
    run(tmp_path, tiny_dataset, "--max_iters=1", "--eval_interval=1", "--overwrite")
    assert sorted(logged(tmp_path / "out", "train_loss")) == [1]
    assert not (tmp_path / "out" / checkpoint.MERGED).exists()


@pytest.mark.parametrize("bad", ["--dataset=grafito25kk", "--seed=-1", "--init_from=/nonexistent/model"])
def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(tmp_path, tiny_dataset, bad):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(GrafitoError):
        run(tmp_path, tiny_dataset, "--max_iters=1", "--overwrite", bad)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert (tmp_path / "out" / checkpoint.BEST / "model.safetensors").exists()


def test_resume_logs_each_step_once(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    with open(tmp_path / "out" / "log.jsonl", "a") as log:  # steps 3-4 ran, then an interruption before a save
        log.write(json.dumps({"step": 3, "train_loss": 99.0}) + "\n" + json.dumps({"step": 4, "train_loss": 99.0}) + "\n")
        log.write('{"step": 5, "train_lo')  # the crash cut this line short
    run(tmp_path, tiny_dataset, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "out" / "log.jsonl") if "train_loss" in line]
    assert steps == [1, 2, 3, 4] and 99.0 not in logged(tmp_path / "out", "train_loss").values()


def test_a_second_run_into_a_busy_out_dir_is_refused(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import checkpoint; "
              f"lock = checkpoint.RunLock({str(tmp_path / 'out')!r}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GrafitoError, match="in use by a running training run"):
            run(tmp_path, tiny_dataset, "--max_iters=4", "--init_from=resume")
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path, tiny_dataset, "--max_iters=4", "--init_from=resume")  # the holder died: the lock went with it


def test_token_ids_beyond_the_model_vocabulary_are_refused_at_load(tmp_path, tiny_dataset):
    import shutil

    shutil.copytree(tiny_dataset, tmp_path / "bad")
    tokens = np.memmap(tmp_path / "bad" / "val.bin", dtype=np.uint16, mode="r+")
    tokens[3] = 60000
    tokens.flush()
    with pytest.raises(GrafitoError, match="token id 60000"):
        run(tmp_path, tmp_path / "bad", "--max_iters=1")


def test_out_dir_with_a_tilde_is_the_home_folder(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train.train(train.load_train_config(TINY + [f"--dataset={tiny_dataset}", "--out_dir=~/run", "--max_iters=1"]))
    assert (tmp_path / "home" / "run" / checkpoint.BEST).is_dir()
    assert not Path("~").exists()


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_dataset):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(GrafitoError, match="out_dir"):
        run(tmp_path, tiny_dataset, "--max_iters=1", out="file/run")


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_dataset):
    args = [ROOT / "train.py", *TINY, f"--dataset={tiny_dataset}", "--max_iters=4", "--eval_interval=4",
            "--gradient_accumulation_steps=2", "--batch_size=2", "--learning_rate=1e-3"]
    single = run_script(*args, f"--out_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                     f"--out_dir={tmp_path / 'two'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = logged(tmp_path / "one", "train_loss"), logged(tmp_path / "two", "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_ddp_resume_with_dropout_is_exact(tmp_path, tiny_dataset):
    """Each rank draws its own dropout masks and resumes its own random stream."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "train.py", *TINY,
            f"--dataset={tiny_dataset}", "--eval_interval=2", "--gradient_accumulation_steps=2", "--batch_size=2",
            "--dropout=0.1", "--lr_decay_iters=4", "--learning_rate=1e-3"]
    straight = run_script(*args, "--max_iters=4", f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script(*args, "--max_iters=2", f"--out_dir={tmp_path / 'resumed'}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(*args, "--max_iters=4", "--init_from=resume", f"--out_dir={tmp_path / 'resumed'}")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)


def test_ddp_stops_every_rank_when_rank_0_fails_to_save(tmp_path, tiny_dataset):
    """Only rank 0 saves; when that fails the other rank stops with a message saying why."""
    out = tmp_path / "out"
    common = ["--eval_interval=2", "--gradient_accumulation_steps=2", "--batch_size=2"]
    run(tmp_path, tiny_dataset, "--max_iters=2", *common)
    (out / "ckpt.old").write_text("a file where the previous ckpt/ is parked: the next save's swap fails")
    ddp = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "train.py", *TINY,
                     f"--dataset={tiny_dataset}", "--max_iters=4", *common, f"--out_dir={out}", "--init_from=resume",
                     timeout=300)
    assert ddp.returncode != 0
    assert "rank 1: stopping, rank 0 failed" in ddp.stdout + ddp.stderr


def two_machines(tmp_path, *args, homes=("a", "b")):
    """The run as two one-process torchrun 'machines' on this one, each with its own home folder."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = []
    for node, home in enumerate(homes):
        (tmp_path / home).mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(tmp_path / home), GRAFITO_SHARED_FOLDER_WAIT="1")
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
             "--master_addr=127.0.0.1", f"--master_port={port}", ROOT / "train.py", *TINY, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env))
    return [(node.wait(timeout=300), node.stdout.read()) for node in nodes]


def test_a_run_across_machines_needs_an_out_dir_they_share(tmp_path, tiny_dataset):
    """Every rank reads a resume's checkpoint from out_dir; '~/run' is a different folder on each 'machine'."""
    args = [f"--dataset={tiny_dataset}", "--max_iters=1", "--eval_interval=1", "--batch_size=2"]
    shared = two_machines(tmp_path, *args, f"--out_dir={tmp_path / 'shared'}")
    assert [code for code, _ in shared] == [0, 0], shared[0][1][-3000:]
    apart = two_machines(tmp_path, *args, "--out_dir=~/run")
    assert all(code != 0 for code, _ in apart)
    assert "is not shared by the machines of this run: 1 of 2 processes cannot see" in apart[0][1] + apart[1][1]


def test_accumulation_rounds_up_to_the_process_count():
    """The codename configs say gradient_accumulation_steps=1; under torchrun each process needs one."""
    def steps(world, **config):
        return train.accumulation_steps({"tokens_per_step": 0, "gradient_accumulation_steps": 1, "batch_size": 4,
                                         "block_size": 128, **config}, world)

    assert steps(1) == 1 and steps(8) == 8 and steps(2, gradient_accumulation_steps=6) == 6
    assert steps(4, gradient_accumulation_steps=6) == 8
    assert steps(1, tokens_per_step=4 * 128 * 3 + 1) == 4 and steps(2, tokens_per_step=4 * 128 * 3) == 4


def test_fp16_training_on_the_cpu_runs_with_the_grad_scaler(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, "--max_iters=6", "--eval_interval=6", "--dtype=float16", "--learning_rate=3e-3")
    state = torch.load(tmp_path / "out" / checkpoint.LATEST / checkpoint.TRAIN_STATE, weights_only=True)
    assert state["scaler"]["scale"] >= 2.0 ** 16  # no step was skipped for inf/NaN gradients
    losses = logged(tmp_path / "out", "train_loss")
    assert losses[6] < losses[1]


# ----------------------------------------------------------------------------- LoRA runs

LORA = ["--lora_r=4", "--lora_targets=q,v,mlp_fc", "--learning_rate=5e-3", "--lr_decay_iters=6", "--eval_interval=3"]


def test_lora_run_trains_adapters_only(tmp_path, tiny_dataset, tiny_pretrained):
    trained = dict(run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--max_iters=6", *LORA).named_parameters())
    for name, param in GPT.from_pretrained(tiny_pretrained).named_parameters():
        assert torch.equal(param, trained[name].float()), name
    losses = logged(tmp_path / "out", "train_loss")
    assert losses[6] < losses[1]


def test_lora_checkpoints_hold_the_adapter_only(tmp_path, tiny_dataset, tiny_pretrained):
    run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--max_iters=3", *LORA)
    ckpt = tmp_path / "out" / checkpoint.LATEST
    assert (ckpt / lora.ADAPTER_WEIGHTS).stat().st_size < 0.1 * (tiny_pretrained / "model.safetensors").stat().st_size
    assert not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / lora.ADAPTER_CONFIG).read_text())["base_model"] == str(tiny_pretrained.resolve())


def test_lora_merge_writes_the_adapter_folded_into_its_base(tmp_path, tiny_dataset, tiny_pretrained):
    run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--max_iters=3", *LORA, "--lora_merge=true")
    merged = GPT.from_pretrained(tmp_path / "out" / checkpoint.MERGED).eval()
    reloaded = checkpoint.load_model(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(merged(idx)[0], reloaded(idx)[0], atol=1e-5)


def test_lora_resume_is_exact(tmp_path, tiny_dataset, tiny_pretrained):
    args = [f"--init_from={tiny_pretrained}", *LORA]
    run(tmp_path, tiny_dataset, "--max_iters=6", *args, out="straight")
    run(tmp_path, tiny_dataset, "--max_iters=3", *args, out="resumed")
    run(tmp_path, tiny_dataset, "--max_iters=6", *args[1:], "--init_from=resume", out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) < 1e-6 for s in a)


def test_a_new_adapter_on_an_adapter_run(tmp_path, tiny_dataset, tiny_pretrained):
    run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--max_iters=3", *LORA, out="first")
    second = run(tmp_path, tiny_dataset, f"--init_from={tmp_path / 'first'}", "--max_iters=2", *LORA, out="second")
    saved = json.loads((tmp_path / "second" / checkpoint.BEST / lora.ADAPTER_CONFIG).read_text())
    assert saved["base_model"] == str((tmp_path / "first").resolve())
    lora.merge_lora(second)
    idx = torch.randint(0, 50257, (2, 16))
    chained = checkpoint.load_model(tmp_path / "second").eval()
    assert torch.allclose(second.eval().float()(idx)[0], chained(idx)[0], atol=1e-5)


def test_a_run_may_not_start_from_weights_inside_its_own_out_dir(tmp_path, tiny_dataset, tiny_pretrained):
    run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--max_iters=2", *LORA)
    with pytest.raises(GrafitoError, match="would overwrite the weights it starts from"):
        run(tmp_path, tiny_dataset, "--max_iters=1", f"--init_from={tmp_path / 'out'}", *LORA[1:], "--overwrite")


def test_a_gpt2_family_variant_trains_resumes_and_saves_its_settings(tmp_path, tiny_dataset):
    """Cerebras-GPT-like: exact GELU, 2048 positions (trained here at block 128), a 3 x n_embd MLP."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_inner=192, activation="gelu", block_size=2048)).save_pretrained(
        tmp_path / "variant")
    args = [f"--init_from={tmp_path / 'variant'}", "--lora_r=4", "--lora_targets=q,v,mlp_fc,mlp_proj",
            "--learning_rate=5e-3", "--lr_decay_iters=6", "--eval_interval=3", "--lora_merge=true"]
    run(tmp_path, tiny_dataset, "--max_iters=6", *args, out="straight")
    run(tmp_path, tiny_dataset, "--max_iters=3", *args, out="resumed")
    run(tmp_path, tiny_dataset, "--max_iters=6", *args[1:], "--init_from=resume", out="resumed")
    a, b = logged(tmp_path / "straight", "train_loss"), logged(tmp_path / "resumed", "train_loss")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) < 1e-6 for s in a)
    merged = json.loads((tmp_path / "straight" / checkpoint.MERGED / "config.json").read_text())
    assert (merged["activation_function"], merged["n_inner"], merged["n_positions"]) == ("gelu", 192, 2048)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "straight" / checkpoint.MERGED).eval()
    ours = checkpoint.load_model(tmp_path / "straight" / checkpoint.MERGED).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- failures and options

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    run(tmp_path, tiny_dataset, "--max_iters=2", "--eval_interval=2")
    saved = (tmp_path / "out" / checkpoint.LATEST / "model.safetensors").read_bytes()
    real = loss.supervised_cross_entropy
    monkeypatch.setattr(loss, "supervised_cross_entropy", lambda *args: real(*args) * float("nan"))
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
    (["--out_dir="], "out_dir = '' is invalid"),
    (["--epochs=inf"], "epochs = inf is invalid: must be a finite number"),
    (["--seed=-1"], "seed = -1 is invalid"),
    (["--seed=100000000000000000000000"], "seed = 100000000000000000000000 is invalid"),
    (["--learning_rate=nan"], "learning_rate = nan is invalid"),
    (["--n_layer=100000"], "n_layer = 100000 is invalid"),
    (["--batch_size=100000"], "batch_size = 100000 is invalid"),
    (["--block_size=1000000000"], "block_size = 1000000000 is invalid"),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(GrafitoError) as err:
        train.check_config(load_config(train.DEFAULTS, TINY + argv))
    assert message in str(err.value)


def test_unknown_keys_and_wrong_types_in_config_files(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("learning_rate = 1e-4\nbatchsize = 4\n")
    with pytest.raises(GrafitoError, match="unknown config key 'batchsize'"):
        load_config(train.DEFAULTS, [str(bad)])
    bad.write_text("max_iters = 1.5\n")
    with pytest.raises(GrafitoError, match="max_iters = 1.5 should be a int"):
        load_config(train.DEFAULTS, [str(bad)])


def test_command_line_overrides_follow_config_files():
    config = load_config(train.DEFAULTS, [str(ROOT / "config" / "ruby_002.py"), "--max_iters", "20", "--compile"])
    assert config["max_iters"] == 20 and config["compile"] is True and config["learning_rate"] == 1e-4


def test_epochs_and_max_iters_the_later_one_wins(tmp_path):
    obsidian = str(ROOT / "config" / "obsidian_000.py")  # says epochs = 2
    assert (lambda c: (c["epochs"], c["max_iters"]))(train.load_train_config([obsidian, "--max_iters=20"])) == (0.0, 20)
    config = train.load_train_config([obsidian, "--max_iters=20", "--epochs=1"])
    assert (config["epochs"], config["max_iters"]) == (1.0, train.DEFAULTS["max_iters"])
    config = train.load_train_config([str(ROOT / "config" / "cpu_tiny.py"), "--epochs=0"])  # 0: not by epochs
    assert (config["epochs"], config["max_iters"]) == (0.0, 300)
    bad = tmp_path / "both.py"
    bad.write_text("epochs = 2.0\nmax_iters = 50\n")
    with pytest.raises(GrafitoError, match="sets both epochs and max_iters"):
        train.load_train_config([str(bad)])


def test_block_size_larger_than_the_model_is_refused(tmp_path, tiny_dataset, tiny_pretrained):
    with pytest.raises(GrafitoError, match="block_size = 256 is invalid: must be at most the model's context"):
        run(tmp_path, tiny_dataset, f"--init_from={tiny_pretrained}", "--block_size=256", "--max_iters=1")


def test_a_model_too_large_for_this_machine_is_refused_before_allocating(tmp_path, tiny_dataset):
    with pytest.raises(GrafitoError, match=r"this model needs about [\d,.]+ GiB, more than the"):
        run(tmp_path, tiny_dataset, "--n_layer=2000", "--n_embd=8192", "--n_head=64", "--max_iters=1")


def test_a_batch_too_large_for_this_machine_is_refused_before_allocating(tmp_path, tiny_dataset):
    with pytest.raises(GrafitoError, match="needs about .* GiB"):
        run(tmp_path, tiny_dataset, "--batch_size=60000", "--max_iters=1")


def test_cli_errors_are_one_line_without_a_traceback():
    result = run_script(ROOT / "train.py", "--batch_size=0")
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
    train.check_config(config)
    train.train(config)
    assert sorted(logged(tmp_path / "o", "train_loss")) == [1] and (tmp_path / "o" / checkpoint.BEST).is_dir()


def test_a_dataset_without_val_split_still_trains_and_saves(tmp_path, tmp_path_factory):
    no_val = prepare_head(tmp_path_factory.mktemp("data") / "noval", 10, 0)
    run(tmp_path, no_val, "--max_iters=2", "--eval_interval=1")
    assert (tmp_path / "out" / checkpoint.BEST / "model.safetensors").exists()
    assert sorted(logged(tmp_path / "out", "train_loss")) == [1, 2] and not logged(tmp_path / "out", "val_loss")
