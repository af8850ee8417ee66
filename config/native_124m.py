# native-124m: GPT-2 124M trained from scratch on FineWeb-Edu, the reproduction nanoGPT and
# llm.c made of OpenAI's GPT-2 small, for GPUs (8 x A100/H100: a few hours).
#   python prepare/text.py --input=hub:HuggingFaceFW/fineweb-edu --subset=sample-10BT --out_dir=data/fineweb_edu_10b
#   torchrun --standalone --nproc_per_node=8 train.py config/native_124m.py
# Values from karpathy/build-nanogpt's train_gpt2.py, which takes them from the GPT-3 paper's
# 124M row (Brown et al., 2020, table 2.1): a 0.5M-token batch, peak learning rate 6e-4 with
# warmup over 375M tokens and cosine decay to a tenth, weight decay 0.1, AdamW betas
# 0.9/0.95, gradient clipping at 1.0, one epoch of the 10B-token sample.
out_dir = "out/native_124m"
init_from = "scratch"
objective = "lm"
dataset = "fineweb_edu_10b"

n_layer = 12  # GPT-2 small's shape
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0  # one pass over 10B tokens does not overfit
bias = True

batch_size = 16  # rows of 1024 tokens per GPU and micro-step (64 fits an 80 GB GPU; raise it there)
tokens_per_step = 524_288  # 2**19: gradient accumulation chosen to reach it on any number of GPUs
max_iters = 19_073  # 10e9 / 524,288: one epoch of the 10B-token sample
warmup_iters = 715  # 375M tokens / 524,288
learning_rate = 6e-4
min_lr = 6e-5
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_iters = 20  # 20 x 16 x 1024 = 328K val tokens per evaluation, per process
log_interval = 10

device = "auto"
dtype = "auto"  # bf16 autocast on Ampere and newer
compile = True
