# diamond-001: OpenAI's gpt2-large (774M) adapted to grafito-25k with LoRA (the README's model table says why these values).
# Memory: one GPU, one process (no --fsdp, no activation checkpointing), the frozen base in bf16; the plan
# (python train.py config/diamond_001.py --plan) puts a step at 8.1 GiB: a 16 GB GPU and up.
out_dir = "out/diamond_001"
init_from = "gpt2-large"
dataset = "grafito25k"

block_size = 1024
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "q,v"
lora_merge = True

learning_rate = 1.5e-4
min_lr = 1.5e-4 / 10
weight_decay = 0.0
epochs = 3.0
batch_size = 4
gradient_accumulation_steps = 1
warmup_iters = 30
lr_schedule = "cosine"
grad_clip = 1.0
dropout = 0.0
eval_interval = 50
log_interval = 10

device = "auto"
dtype = "auto"
compile = True
