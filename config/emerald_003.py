# emerald-003: OpenAI's gpt2-xl (1.5B) adapted to grafito-25k with LoRA (the README's model table says why these values).
# Memory: one GPU, one process (no --fsdp, no activation checkpointing), the frozen base in bf16; the plan
# (python train.py config/emerald_003.py --plan) puts a step at 13.6 GiB: a 16 GB GPU and up. Fully fine-tuning
# gpt2-xl (--lora_r=0) takes 32 GiB on one GPU; --fsdp=True spreads it (--plan --lora_r=0 --plan_world=4: 16.1 GiB
# a GPU, 7.0 with --activation_checkpointing=True).
out_dir = "out/emerald_003"
init_from = "gpt2-xl"
dataset = "grafito25k"

block_size = 1024
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = "q,v"
lora_merge = True

learning_rate = 1e-4
min_lr = 1e-4 / 10
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
