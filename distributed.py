"""Several training processes (torchrun): their set-up, rank 0's solo work, their RNG streams,
and the two ways they share the model: DDP (a whole copy each) or FSDP (each holds a shard).

A plain `python train.py` is one process and every function here is then a no-op or nearly.
Under `torchrun --nproc_per_node=N train.py ...` each process trains on its share of every
step's rows. With DDP rank 0 alone evaluates and writes the run folder, and tells the others
whether it failed; with FSDP (--fsdp) no process holds the whole model, so every rank takes
part in each forward pass, evaluation and checkpoint (checkpoint.py writes the sharded ones).
"""

import gc
import inspect
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from common import DTYPES, GrafitoError, setup


def setup_distributed(config):
    """(rank, local_rank, world, device, dtype) under torchrun, else (0, 0, 1, device, dtype)."""
    if "RANK" not in os.environ:
        if config.get("fsdp"):
            raise GrafitoError("--fsdp shards the model over torchrun's processes: launch with torchrun "
                               "(torchrun --standalone --nproc_per_node=N train.py ..., N=1 for one GPU)")
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
    # each rank draws its own dropout masks; with FSDP (no rank 0 copy is broadcast, as DDP does) every rank
    # first builds the same model from the same seed, and shard_model then moves ranks > 0 to their own streams
    device, dtype = setup(device, config["dtype"], seed=config["seed"] + (0 if config.get("fsdp") else rank))
    # rank 0 evaluates and saves while the others wait in a collective: a large save must not time them out
    dist.init_process_group(backend=backend, timeout=timedelta(hours=2),
                            device_id=torch.device(device) if on_gpu else None)
    return rank, local_rank, world, device, dtype


def several_machines():
    """Whether torchrun started this run's processes on more than one machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) < int(os.environ.get("WORLD_SIZE", 1))


def check_shared_folder(folder, rank, world, device, wait=None):
    """Refuse a run across machines whose out_dir is not one folder they all see: every rank reads
    a resume's checkpoint and a DPO run's stored reference from it, and rank 0 writes them (with
    FSDP every rank writes its shards of the checkpoint there too).

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


def close_distributed(finished=False):
    """End the process group. finished: every rank got here without an error, so they first wait
    for each other (the last collectives done everywhere) and the model's references to the
    group are collected while Python still runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()


def leave_torchrun_process():
    """End a torchrun process that finished well without Python's shutdown, its output flushed:
    during that shutdown a gloo worker thread can still drop the last reference to a
    collective's tensor, which needs the interpreter, and the process aborts (SIGABRT,
    'terminate called without an active exception') after all its work is done and saved."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for every process it starts
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wrap_ddp(model, device, local_rank):
    """The model in DistributedDataParallel: gradients averaged across processes in the backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # training changes no buffer: nothing to send before every forward (the option's name changed in torch 2.13)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None, **no_buffer_sync)


# ----------------------------------------------------------------------------- FSDP: the model sharded

def fsdp_api():
    """torch's FSDP2 (fully_shard, its precision policy, register_fsdp_forward_method), or one error."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise GrafitoError(f"--fsdp needs torch 2.6 or newer (torch.distributed.fsdp.fully_shard); this is torch "
                           f"{torch.__version__}. Upgrade torch, or train without --fsdp") from None
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def shard_model(gpt, trained, device, dtype, world):
    """Shard gpt over the processes with FSDP2, in place: each transformer block is a unit whose
    weights are gathered just before it runs and freed after; the rest (embeddings, the tied
    output layer, the final LayerNorm) form the root unit, kept whole from the start of the
    forward pass to the end of the backward, so loss.py's fused output layer finds the tied
    weight whole. trained is the module the loop calls (gpt itself, or DPO's AnswerLogProbs,
    which calls gpt.hidden_states rather than its forward: that becomes a forward for FSDP too).

    Master weights, gradients and AdamW state stay float32 and sharded; a 16-bit dtype gathers
    the weights in that dtype for compute and reduces gradients in float32. Frozen (LoRA base)
    and trained (adapter) weights share units: FSDP2 reduces only what has gradients. A model
    built on the meta device (a resume's shape, its weights to come from the checkpoint) gets
    empty storage on the device here."""
    fully_shard, MixedPrecisionPolicy, register_forward = fsdp_api()
    from torch.distributed.device_mesh import init_device_mesh

    if torch.distributed.get_rank() > 0:  # each rank its own dropout masks from here on, as under DDP
        torch.manual_seed(torch.initial_seed() + torch.distributed.get_rank())
    mesh = init_device_mesh(torch.device(device).type, (world,))
    half = DTYPES[dtype] if dtype in ("bfloat16", "float16") else None
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32 if half else None)
    for block in gpt.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(gpt, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if trained is not gpt:
        register_forward(gpt, "hidden_states")
    if any(p.is_meta for p in gpt.parameters()):
        gpt.to_empty(device=device)
    return gpt


def grad_scaler(device, dtype, sharded):
    """float16's gradient scaler (disabled in other dtypes); a sharded model's checks every rank's
    shards for inf/NaN, so that all skip the same steps."""
    if sharded and dtype == "float16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.split(":")[0])
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")


def fsdp_units(model):
    """The FSDP units of a model, outermost first ([] when it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6: nothing is sharded
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model):
    return bool(fsdp_units(model))


def reshard(model):
    """Free the whole copies of a sharded model's weights (evaluation leaves the root unit's
    gathered), so that saving and the next step start from the shards."""
    for unit in fsdp_units(model):
        unit.reshard()


def gradient_sync(model, sync):
    """Context for one micro-batch's backward: with sync=False the gradients stay in this process
    (accumulated; DDP's no_sync, FSDP's set_requires_gradient_sync(False)) and the micro-batch
    that syncs reduces them all at once."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    units = fsdp_units(model)
    return _fsdp_no_sync(units[0]) if units else nullcontext()


@contextmanager
def _fsdp_no_sync(root):
    root.set_requires_gradient_sync(False)  # recurses into every unit
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def gather_full_weights(model, names, rank):
    """{name: whole float tensor on the CPU} of the named parameters of a sharded model on rank
    0, {} on the others: gathered one parameter at a time, so no device holds more than one
    whole tensor beyond its shard (rank 0's CPU memory holds them all). Every rank calls it."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    weights = {}
    for name, param in model.named_parameters():
        if name in names:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if rank == 0:
                weights[name] = whole.detach().to("cpu", copy=True)
            del whole
    return weights


def model_work(work, rank, world, device, sharded):
    """Work that runs the model (evaluation, saving): rank 0 alone, the others waiting for its
    verdict (on_first_rank); with a sharded model every rank, each holding its part."""
    return work() if sharded else on_first_rank(work, rank, world, device)


def every_rank_agrees(ok, device):
    """Whether ok holds on every rank (a collective: every rank calls it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


def share_from_first_rank(value):
    """Rank 0's value (a small picklable object) on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
