"""Several training processes (torchrun): their set-up, rank 0's solo work, their RNG streams, DDP.

A plain `python train.py` is one process and every function here is then a no-op or nearly.
Under `torchrun --nproc_per_node=N train.py ...` each process trains on its share of every
step's rows; rank 0 alone writes the run folder, and tells the others whether it failed.
"""

import inspect
import os
import time
from datetime import timedelta
from pathlib import Path

import torch

from common import GrafitoError, setup


def setup_distributed(config):
    """(rank, local_rank, world, device, dtype) under torchrun, else (0, 0, 1, device, dtype)."""
    if "RANK" not in os.environ:
        return (0, 0, 1) + setup(config["device"], config["dtype"], seed=config["seed"])
    import torch.distributed as dist

    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = config["device"]
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = config["backend"] if config["backend"] != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise GrafitoError("backend=nccl runs on CUDA GPUs only; use backend=gloo (or auto) with device=cpu")
    if on_gpu:  # each process its own GPU, made current before the process group binds to it
        device = f"cuda:{local_rank}"
    else:  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # each rank draws its own dropout masks
    device, dtype = setup(device, config["dtype"], seed=config["seed"] + rank)
    # rank 0 evaluates and saves while the others wait in a collective: a large save must not time them out
    dist.init_process_group(backend=backend, timeout=timedelta(hours=2),
                            device_id=torch.device(device) if on_gpu else None)
    return rank, local_rank, world, device, dtype


def several_machines():
    """Whether torchrun started this run's processes on more than one machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) < int(os.environ.get("WORLD_SIZE", 1))


def check_shared_folder(folder, rank, world, device, wait=None):
    """Refuse a run across machines whose out_dir is not one folder they all see: every rank reads
    a resume's checkpoint and a DPO run's stored reference from it, and rank 0 alone writes them.

    Rank 0 writes a token into folder; every rank looks for it, for up to `wait` seconds
    (network filesystems may show a new file late). A no-op on one machine."""
    if world == 1 or not several_machines():
        return
    import torch.distributed as dist

    wait = float(os.environ.get("GRAFITO_SHARED_FOLDER_WAIT", 30)) if wait is None else wait
    token = torch.randint(1 << 62, (1,), device=device) if rank == 0 else torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(token, src=0)
    probe = Path(folder) / ".shared-folder-check"
    if rank == 0:
        probe.write_text(str(int(token)))
    dist.barrier()
    deadline = time.monotonic() + wait
    while True:
        try:
            seen = probe.read_text().strip() == str(int(token))
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = torch.tensor([0 if seen else 1], device=device)
    dist.all_reduce(missing)
    dist.barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    if int(missing):
        raise GrafitoError(f"out_dir {folder} is not shared by the machines of this run: {int(missing)} of {world} "
                           f"processes cannot see what rank 0 writes there. Put out_dir on a filesystem every "
                           f"machine mounts at the same path (NFS, Lustre, a cloud file share); docs/training.md, "
                           f"'Several machines'")


def close_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model, device, local_rank):
    """The model in DistributedDataParallel: gradients averaged across processes in the backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # training changes no buffer: nothing to send before every forward (the option's name changed in torch 2.13)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None, **no_buffer_sync)


def on_first_rank(work, rank, world, device):
    """Run work() on rank 0 and tell every rank its result (a small int) or that it failed,
    so the others stop with a message instead of dying in their next collective."""
    outcome, error = 0, None
    if rank == 0:
        try:
            outcome = int(work() or 0)
        except BaseException as err:
            outcome, error = -1, err
    if world > 1:
        shared = torch.tensor(outcome, device=device)
        torch.distributed.broadcast(shared, src=0)
        outcome = int(shared.item())
    if error is not None:
        raise error
    if outcome == -1:
        raise GrafitoError(f"rank {rank}: stopping, rank 0 failed (see its message)")
    return outcome


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's own device
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world):
    """Every rank's RNG states, in rank order (saved so that each rank resumes its own stream)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states
