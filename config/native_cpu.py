# native-cpu: a small GPT trained from scratch on the Brown Corpus on 2 CPU cores (1.6M tokens;
# docs/results.md has the measured time): the whole native chain (text -> base -> chat ->
# preferences) without a GPU, the README's commands.
#   python prepare/text.py --input=../shared/data/brown/brown.jsonl.gz --out_dir=data/brown
#   python train.py config/native_cpu.py
# 1.3M tokens teach a model this size the shape of English (spelling, punctuation, common
# phrases), not knowledge. Its 1024-token context lets chat configs start from it unchanged.
out_dir = "out/native_cpu"
init_from = "scratch"
objective = "lm"
dataset = "brown"

n_layer = 6  # the 50,257-word output layer is most of a small model's work: kept narrow
n_head = 4
n_embd = 128
block_size = 1024
dropout = 0.0

batch_size = 4  # 4 windows of 1024 tokens a step
max_iters = 400  # 1.6M tokens: about 1.3 passes over the train split
eval_interval = 100
eval_iters = 8  # 8 x 4 x 1024 tokens: about half the val split
log_interval = 10

learning_rate = 2e-3  # small models from scratch take large steps
min_lr = 2e-4
warmup_iters = 30
weight_decay = 0.1

device = "cpu"
dtype = "bfloat16"
compile = False
