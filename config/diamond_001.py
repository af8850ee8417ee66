# diamond-001: OpenAI's gpt2-large (774M) adapted to grafito-25k with LoRA.
# The original README lists this size as "coming soon" and says the project moved towards
# LoRA; everything below is chosen here, following the LoRA paper (Hu et al. 2021) for GPT-2.
out_dir = "out/diamond_001"
init_from = "gpt2-large"
dataset = "grafito25k"  # python prepare/grafito25k.py

block_size = 1024
lora_r = 16  # the paper's GPT-2 runs use r=4; 16 leaves room for a more varied chat dataset
lora_alpha = 32.0  # alpha / r = 2, the scale common LoRA recipes use
lora_dropout = 0.05
lora_targets = "q,v"  # W_q and W_v, the paper's choice, as separate adapters on the fused c_attn
lora_merge = True  # also write out/diamond_001/merged, a plain GPT-2 folder (sample.py loads either)

# Adapters learn slowly from few parameters: a higher learning rate than full fine-tuning
# (1.5e-4; larger models take smaller steps), no weight decay on the near-zero factors, 3 epochs
# of the ~715 packed rows, 4 rows (4,096 tokens) per step.
learning_rate = 1.5e-4
min_lr = 1.5e-4 / 10
weight_decay = 0.0
epochs = 3.0
batch_size = 4
gradient_accumulation_steps = 1
warmup_iters = 30
lr_schedule = "cosine"
grad_clip = 1.0
dropout = 0.0  # the adapters have their own dropout; the frozen base runs deterministically
eval_interval = 50
log_interval = 10

device = "auto"
dtype = "auto"
compile = True
