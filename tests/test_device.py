"""The GPU set-up every command runs, on an emulated GPU (conftest.emulated_gpu): the CPU build
of torch reports a CUDA device, torch's own argument checks stay, and the first tensor that
really moves to the GPU fails. A command that reaches that point got through its set-up."""

import sys

import pytest
import torch

import checkpoint
import common
import train
from common import GrafitoError

# the CPU build, past the set-up, at the first tensor really made on the GPU
NO_CUDA = (AssertionError, NotImplementedError), "Torch not compiled with CUDA enabled|from the 'CUDA' backend"


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_setup_names_the_gpu_with_its_index_and_selects_it(emulated_gpu, monkeypatch, device):
    selected = emulated_gpu()
    cpu_allocator = []
    monkeypatch.setattr(common, "keep_cpu_memory", lambda: cpu_allocator.append(True))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert common.setup(device, "auto") == ("cuda:0", "bfloat16")
    assert selected == [0]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert cpu_allocator == []  # the CPU allocator's settings are for CPU runs only


@pytest.mark.parametrize("capability,expected", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_follows_the_emulated_gpu(emulated_gpu, capability, expected):
    emulated_gpu(capability=capability, name="NVIDIA T4" if capability < (8, 0) else "NVIDIA A100-SXM4-80GB")
    assert common.setup("cuda", "auto")[1] == expected


def test_a_gpu_index_the_machine_lacks_is_refused(emulated_gpu):
    emulated_gpu()
    with pytest.raises(GrafitoError, match="has 1 CUDA device"):
        common.setup("cuda:1", "auto")


def test_device_memory_and_peak_come_from_the_gpu(emulated_gpu):
    emulated_gpu(name="NVIDIA L4", memory=24 * 2 ** 30)
    device, dtype = common.setup("cuda", "auto")
    assert common.device_memory(device) == 24 * 2 ** 30
    assert common.peak_flops(device, dtype) == 121e12
    with pytest.raises(GrafitoError, match="more than the 24.0 GiB of memory on cuda:0"):
        common.check_memory(25 * 2 ** 30, device, "a step", "use less")


TINY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--batch_size=2", "--plot=false",
            "--max_iters=2", "--eval_interval=2", "--warmup_iters=1"]


def test_train_gets_through_its_set_up_to_the_first_gpu_tensor(emulated_gpu, tmp_path, tiny_dataset):
    emulated_gpu()
    config = train.load_train_config(["--init_from=scratch", *TINY_RUN, f"--dataset={tiny_dataset}",
                                      f"--out_dir={tmp_path / 'out'}"])
    train.check_config(config)
    with pytest.raises(NO_CUDA[0], match=NO_CUDA[1]):
        train.train(config)


def test_train_refuses_a_step_the_gpus_memory_cannot_hold(emulated_gpu, tmp_path, tiny_dataset, tiny_pretrained):
    emulated_gpu(capability=(7, 5), name="Tesla T4", memory=2 ** 20)
    config = train.load_train_config([f"--init_from={tiny_pretrained}", *TINY_RUN, f"--dataset={tiny_dataset}",
                                      f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(GrafitoError, match="a training step needs about .* GiB of memory on cuda:0"):
        train.train(config)


def test_a_resume_on_a_gpu_where_auto_means_another_dtype_is_refused(emulated_gpu, tmp_path, tiny_dataset):
    """A run trained in bf16 (auto on this CPU), resumed where auto means fp16 (a T4): its grad
    scaler state would not match, and its numbers would not continue the run's."""
    args = ["--init_from=scratch", *TINY_RUN, f"--dataset={tiny_dataset}", f"--out_dir={tmp_path / 'out'}",
            "--device=auto", "--dtype=auto"]
    config = train.load_train_config(args)
    train.check_config(config)
    train.train({**config, "device": "cpu"})
    assert torch.load(tmp_path / "out" / checkpoint.LATEST / checkpoint.TRAIN_STATE,
                      weights_only=True)["resolved_dtype"] == "bfloat16"
    emulated_gpu(capability=(7, 5), name="Tesla T4")
    resume = train.load_train_config(args + ["--init_from=resume", "--max_iters=4"])
    with pytest.raises(GrafitoError, match=r"trained in bfloat16 \(dtype=auto\).*auto means float16.*--dtype=bfloat16"):
        train.train(resume)


@pytest.mark.parametrize("command", ["sample", "eval", "bench"])
def test_every_command_gets_through_its_set_up_to_the_first_gpu_tensor(emulated_gpu, monkeypatch, tmp_path, command,
                                                                       tiny_model_dir, tiny_dataset):
    emulated_gpu()
    argv = {"sample": ["sample.py", f"--init_from={tiny_model_dir}", "--max_new_tokens=2"],
            "eval": ["eval.py", f"--models=tiny={tiny_model_dir}", f"--out={tmp_path / 'eval.md'}",
                     f"--datasets={tiny_dataset}", "--accuracy_samples=0"],
            "bench": ["bench.py", "--model=gpt2", "--n_layer=1", "--n_head=2", "--n_embd=32", "--rows=decode",
                      "--repeats=1", "--warmup=0"]}[command]
    monkeypatch.setattr(sys, "argv", argv)
    module = __import__(command)
    with pytest.raises(NO_CUDA[0], match=NO_CUDA[1]):
        module.main()


def test_serving_loads_its_engine_through_the_same_set_up(emulated_gpu, tiny_model_dir):
    import engine

    selected = emulated_gpu()
    with pytest.raises(NO_CUDA[0], match=NO_CUDA[1]):
        engine.load_engine({"init_from": str(tiny_model_dir), "out_dir": "unused", "device": "auto", "dtype": "auto",
                            "compile": False})
    assert selected == [0]
