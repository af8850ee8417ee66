# obsidian-000 tuned on anthropic-hh-rlhf's preference pairs with DPO (Rafailov et al., 2023,
# arXiv:2305.18290, whose dialogue experiment is on this dataset): the SFT model learns from
# the rejected answers too. First train obsidian-000 (config/obsidian_000.py), then
#   python prepare/hh_rlhf.py --pairs          # helpful-base/train -> data/hh_rlhf_pairs
#   python train.py config/obsidian_000_dpo.py
out_dir = "out/obsidian_000_dpo"
init_from = "out/obsidian_000"  # the SFT run's best/ weights: DPO starts from, and is measured against, them
dataset = "hh_rlhf_pairs"
objective = "dpo"

# The paper's beta. label_smoothing > 0 (conservative DPO) would hedge against HH's noisy
# labels; 0 keeps plain DPO, the baseline to compare against first.
beta = 0.1
label_smoothing = 0.0

# LoRA, so DPO fits where SFT fit: the reference model is this model with its adapters switched
# off, no second copy. r=16, alpha=32 on q and v as the other LoRA configs. No dropout anywhere:
# a reward is a log-probability ratio against the dropout-free reference, and dropout in the
# policy would add noise to every reward (TRL switches it off by default for the same reason).
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lora_targets = "q,v"
lora_merge = True  # out_dir/merged: a plain GPT-2 folder for sample.py, eval.py and export.py
dropout = 0.0

# The pairs are prepared for 512-token rows, as obsidian-000 was trained. 8 pairs (16 rows) per
# micro-batch x 8 = 64 pairs per step, the paper's batch. One epoch: DPO overfits the pairs it
# has seen (the implicit rewards keep growing on them) long before SFT would.
block_size = 512
batch_size = 8
gradient_accumulation_steps = 8
epochs = 1.0

# The paper fine-tunes every weight at 1e-6; adapters start at zero and move only a few million
# weights, so they take a larger step, and beta (not weight decay) keeps the policy near the
# reference. Warmup as the paper's 150 steps, scaled to this shorter run.
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 50
lr_schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 50  # the whole val split (about 5% of the pairs) each time: best/ by val DPO loss
log_interval = 10

device = "auto"
dtype = "auto"
compile = True
