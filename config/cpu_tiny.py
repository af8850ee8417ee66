# The whole training loop on a CPU in a few minutes: a small GPT trained from scratch on
# grafito-25k (python prepare/grafito25k.py first). It will not chat well; it shows the
# loop, the falling masked loss, checkpoints and resume working without a GPU or downloads.
out_dir = "out/cpu_tiny"
init_from = "scratch"
dataset = "grafito25k"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0

batch_size = 8  # 8 rows x 256 tokens: about 70 short conversations per step
max_iters = 300
eval_interval = 100
log_interval = 10
eval_iters = 20

learning_rate = 2e-3  # small models from scratch take large steps
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.1

device = "cpu"
dtype = "bfloat16"  # autocast: fast on CPUs with AVX-512 BF16 / AMX, correct everywhere
compile = False
