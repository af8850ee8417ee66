# ruby-002: OpenAI's GPT-2 124M fully fine-tuned on grafito-25k.
# From the original model table: gpt2, sequence length 1024, 1000 steps, learning rate 1e-4.
out_dir = "out/ruby_002"
init_from = "gpt2"
dataset = "grafito25k"  # python prepare/grafito25k.py

block_size = 1024
max_iters = 1000
learning_rate = 1e-4

# Chosen here. grafito-25k packs into ~715 rows of 1024 tokens (its samples are short, p50
# 28 tokens), so 2 rows a step (about 65 conversations, 2,048 tokens) makes the 1000 steps
# about 2.8 epochs: enough passes for a 124M model to learn the format and short answers,
# with best/ (lowest val loss) guarding against the overfitting of the last epoch.
batch_size = 2
gradient_accumulation_steps = 1
warmup_iters = 50
lr_schedule = "cosine"
min_lr = 1e-5  # a tenth of the peak, as in nanoGPT
weight_decay = 0.1
grad_clip = 1.0
dropout = 0.1  # GPT-2's own dropout: regularises the small dataset
eval_interval = 100
log_interval = 10

device = "auto"
dtype = "auto"  # bf16 autocast on Ampere+ GPUs and CPUs, fp16 + grad scaler on older GPUs
compile = True
