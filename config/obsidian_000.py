# obsidian-000: a 124M GPT-2 fully fine-tuned on Anthropic's HH-RLHF conversations.
# From the original model table: 124M, sequence length 512, 2 epochs, learning rate 5e-4,
# anthropic-hh-rlhf. The original base was dlite-v1 (aisquared/dlite-v1-124m on the hub,
# itself a GPT-2 124M fine-tune); any GPT-2 repo loads, so set init_from to it to follow
# the original exactly. gpt2 is the default because it is the base every other codename uses.
out_dir = "out/obsidian_000"
init_from = "gpt2"  # or "aisquared/dlite-v1-124m"
dataset = "hh_rlhf"  # python prepare/hh_rlhf.py (helpful-base/train, 43,835 records)

block_size = 512
epochs = 2.0
learning_rate = 5e-4

# Chosen here. HH-RLHF conversations are longer (p50 ~135 tokens) and the split is ~15x
# grafito-25k's tokens, so 16 rows of 512 (8,192 tokens, ~55 conversations) per step gives
# ~1,700 steps over the 2 epochs. 5e-4 is high for full fine-tuning, hence a longer warmup,
# clipping and cosine decay to a tenth.
batch_size = 16
gradient_accumulation_steps = 1
warmup_iters = 100
lr_schedule = "cosine"
min_lr = 5e-5
weight_decay = 0.1
grad_clip = 1.0
dropout = 0.1
eval_interval = 200
log_interval = 20

device = "auto"
dtype = "auto"
compile = True
