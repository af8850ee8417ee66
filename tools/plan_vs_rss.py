"""The memory plan against a CPU run's measured peak:

    python tools/plan_vs_rss.py [train.py options...]
    torchrun --standalone --nproc_per_node=2 tools/plan_vs_rss.py --fsdp=True [train.py options...]

Runs train.py on the CPU for 2 steps (one evaluation batch, no plot) with the options given, and
prints, for each process, memory.for_run's figure for that run beside the growth of the process's
peak resident memory (VmHWM) from just before the model is built: the weights, gradients, AdamW
state and activations of a step, plus whatever the C allocator keeps.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memory  # noqa: E402
import train  # noqa: E402

GIB = 2 ** 30


def status(field):
    """A /proc/self/status memory figure in bytes (VmRSS: now, VmHWM: the peak so far)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv):
    config = train.load_train_config(argv + ["--device=cpu", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                                             "--plot=false", "--log_interval=1"])
    train.check_config(config)
    seen = {}
    build = train.build_model

    def measured_build(run):
        seen["before"] = status("VmRSS")
        model = build(run)
        lora_config = model.lora_config if train.lora.lora_layers(model) else None
        seen["plan"] = memory.for_run(config, model.config, lora_config,
                                      train.OBJECTIVES[config["objective"]].rows_per_item, run.world,
                                      run.accumulation, run.dtype)
        return model

    train.build_model = measured_build
    train.train(config)
    grown, plan = status("VmHWM") - seen["before"], seen["plan"]
    print(f"rank {os.environ.get('RANK', 0)}: plan: weights {plan.weights / GIB:.2f} + gradients {plan.gradients / GIB:.2f} + optimizer "
          f"{plan.optimizer / GIB:.2f} + activations {plan.activations / GIB:.2f} = {plan.total / GIB:.2f} GiB; "
          f"measured peak RSS growth {grown / GIB:.2f} GiB ({grown / plan.total:.0%} of the plan)")


if __name__ == "__main__":
    main(sys.argv[1:])
