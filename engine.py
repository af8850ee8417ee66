"""Generation: the KV cache, sampling, and the decode loop that sample.py, eval.py and
serve.py all use.

Every row of a batch is a slot of the KV cache holding its own sequence from position 0,
so rows of different lengths need no padding masks, and a row can be (re)filled while the
others go on, which is what continuous batching in serve.py does. A token produces logits
only through a decode step: a prompt's tokens but the last are prefilled (one causal
forward), the last one is the first decode step's input. naive_generate() is the
reference the tests hold this loop equal to.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import tokenizer
from common import GrafitoError, check_memory
from configurator import check_options, integer, number


class KVCache:
    """Keys and values of every layer for `batch_size` slots of up to `max_len` tokens.

    lengths[b] (host) and positions[b] (device) count the tokens slot b holds. The model
    calls layout() and update() in every forward; which kind of forward it is, the engine
    says: a prefill of `rows` from position 0 (causal attention over the new tokens), or
    a decode step of one token per slot (attention over each slot's cached keys).
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size, self.max_len, self.device = batch_size, max_len, device
        self.lengths = [0] * batch_size
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = None  # the slots a prefill fills; None during a decode step
        self.window = max_len  # keys a decode step attends over (the longest slot's, or all)

    def layout(self, T):
        """(positions, attention mask) for the T tokens of the forward about to run."""
        if self.rows is not None:
            return torch.arange(T, device=self.device), None
        key_position = torch.arange(self.window, device=self.device)
        mask = key_position[None, :] <= self.positions[:, None]
        return self.positions[:, None], mask[:, None, None, :]

    def update(self, layer, k, v):
        """Store this forward's keys and values (B, H, T, D); return those attention reads."""
        if self.rows is not None:
            self.keys[layer][self.rows, :, :k.shape[2]] = k
            self.values[layer][self.rows, :, :v.shape[2]] = v
            return k, v
        index = self.positions.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer][:, :, :self.window], self.values[layer][:, :, :self.window]


class MatVecLinear(nn.Linear):
    """nn.Linear whose single-row half-precision products on a CPU go through torch.mv:
    oneDNN's GEMM streams the weights more slowly for one row than the matrix-vector kernel
    (see bench.py --rows=decode). Batch-1 decoding only; everything else is nn.Linear."""

    def forward(self, x):
        if x.numel() == x.shape[-1] and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            y = torch.mv(self.weight, x.reshape(-1))
            y = y if self.bias is None else y + self.bias
            return y.view(*x.shape[:-1], y.shape[0])
        return super().forward(x)


# how a chat model answers unless told otherwise: sample.py's, serve.py's and exported models' defaults
CHAT_DEFAULTS = dict(max_new_tokens=200, temperature=0.7, top_k=50, top_p=1.0, repetition_penalty=1.0)


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_options(vars(self), {
            "temperature": (lambda t: t == 0 or 1e-3 <= t <= 100, "0 (greedy) or between 0.001 and 100"),
            "top_k": integer(0), "top_p": (lambda p: 0 < p <= 1, "in (0, 1]"),
            "repetition_penalty": number(0.01, 100.0),
        }, where="sampling")


def sample(logits, sampling, seen=None, generator=None):
    """Next token ids (B,) from logits (B, V); seen (B, V) marks tokens the penalty pushes down."""
    logits = logits.float()
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any() | torch.isneginf(logits).all(dim=-1).any()):
        raise GrafitoError("the model produced NaN or infinite logits; its weights are damaged (or overflow in "
                           "this dtype: try --dtype=float32)")
    if seen is not None and sampling.repetition_penalty != 1.0:  # CTRL-style
        penalty = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= sampling.top_p, float("-inf"))  # smallest nucleus
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


class Engine:
    """A model ready to generate: eval mode, its weights' dtype, and optionally a compiled
    decode step (fixed shapes: the cache length is rounded up to a multiple of 256, so one
    graph serves many prompts). Give it the model already on its device and dtype."""

    def __init__(self, model, compile=False):
        self.model = model.eval()
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16):
            _use_matvec(model)
        self.compiled = compile
        self._step = self._decode_step
        if compile and self.device.type == "cuda":  # CUDA graphs: small decode steps are launch-bound
            self._step = torch.compile(self._decode_step, dynamic=False, mode="reduce-overhead")
        elif compile:  # frozen weights: the CPU backend pre-packs them for its matmul kernels
            self._step = torch.compile(self._decode_step, dynamic=False, options={"freezing": True})

    def new_cache(self, batch_size, tokens):
        """A cache for batch_size rows of up to `tokens` tokens (at most the context)."""
        if self.compiled:  # few distinct shapes, few compilations
            tokens = math.ceil(tokens / 256) * 256
        config = self.model.config
        needed = 2 * config.n_layer * batch_size * min(tokens, config.block_size) * config.n_embd * self.dtype.itemsize
        check_memory(needed, str(self.device), f"a KV cache for {batch_size} rows", "generate fewer rows at once")
        cache = KVCache(self.model.config, batch_size, min(tokens, self.model.config.block_size), self.device,
                        self.dtype)
        if self.compiled and self.device.type == "cuda":  # CUDA graphs may then update them in place
            for tensor in cache.keys + cache.values + [cache.positions]:
                torch._dynamo.mark_static_address(tensor)
        return cache

    @torch.no_grad()
    def prefill(self, cache, rows, sequences):
        """Fill slots `rows` with token lists `sequences` (from position 0; empty lists allowed)."""
        width = max(len(s) for s in sequences)
        if width:
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            for i, s in enumerate(sequences):
                idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)  # right-padded: causal attention never sees it
            cache.rows = torch.tensor(rows, device=self.device)
            try:
                self.model.hidden_states(idx.to(self.device), cache)
            finally:
                cache.rows = None
        for row, s in zip(rows, sequences):
            cache.lengths[row] = len(s)
        cache.positions[rows] = torch.tensor([len(s) for s in sequences], device=self.device)

    @torch.no_grad()
    def decode(self, cache, tokens, active=None):
        """Logits (B, vocab) after feeding one token per slot; slots not `active` (B bools) stay where they are."""
        if any(n >= cache.max_len for n, on in zip(cache.lengths, active or [True] * cache.batch_size) if on):
            raise ValueError(f"a KV cache slot is full ({cache.max_len} tokens)")
        cache.window = cache.max_len if self.compiled else max(cache.lengths) + 1
        logits = self._step(torch.as_tensor(tokens, device=self.device), cache)
        step = torch.tensor(active, device=self.device) if active is not None else 1
        cache.positions += step
        for row in range(cache.batch_size):
            if active is None or active[row]:
                cache.lengths[row] += 1
        return logits

    def _decode_step(self, tokens, cache):
        return self.model.logits(self.model.hidden_states(tokens[:, None], cache)[:, -1])

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, sampling, stop_ids=(), generator=None, vocab_limit=None):
        """Yield, one step at a time, the new token of every row (a list; None for a row that
        has stopped: it produced one of stop_ids, which is yielded, on an earlier step).

        prompts: token lists (each non-empty). A prompt longer than the context keeps its last
        block_size - 1 tokens. When a row fills the context it restarts from its most recent
        tokens (at least half the context), as a row of its own: rows never change each other.
        vocab_limit: draw only among the first vocab_limit ids (some checkpoints have rows the
        tokenizer cannot decode).
        """
        block_size, stop_ids = self.model.config.block_size, set(stop_ids)
        # 1. every row's tokens so far (the context's worth) and the token its next step feeds
        history = [list(p[-(block_size - 1):]) for p in prompts]
        if any(not h for h in history):
            raise ValueError("every prompt needs at least one token")
        B = len(history)
        cache = self.new_cache(B, max(len(h) for h in history) + max_new_tokens)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            for row, h in enumerate(history):
                seen[row, h] = True
        # 2. prefill all but each prompt's last token
        self.prefill(cache, list(range(B)), [h[:-1] for h in history])
        active = [True] * B
        for step in range(max_new_tokens):
            # 3. a row whose context is full restarts from its recent tokens
            for row in range(B):
                if active[row] and cache.lengths[row] == cache.max_len:
                    keep = max(block_size // 2, block_size - (max_new_tokens - step))
                    self.prefill(cache, [row], [history[row][-keep:-1]])
            # 4. one decode step: each row's last token in, next-token logits out
            logits = self.decode(cache, [h[-1] for h in history], active)
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[:, vocab_limit:] = float("-inf")
            # 5. sample, record, stop
            tokens = sample(logits, sampling, seen, generator).tolist()
            out = []
            for row, token in enumerate(tokens):
                if not active[row]:
                    out.append(None)
                    continue
                out.append(token)
                history[row].append(token)
                del history[row][:-block_size]
                if seen is not None:
                    seen[row, token] = True
                if token in stop_ids:
                    active[row] = False
            yield out
            if not any(active):
                return


def _use_matvec(model):
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear  # the same module and parameters: weight tying is kept


def naive_generate(model, prompt, max_new_tokens):
    """Greedy continuation of one prompt without a cache (the whole context every step): the
    reference Engine.generate is tested against."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        context = torch.tensor([tokens[-model.config.block_size:]])
        with torch.no_grad():
            tokens.append(int(model(context)[0][0, -1].argmax()))
    return tokens[len(prompt):]


def load_engine(options):
    """An Engine for the model options sample.py and serve.py share: init_from ('resume' is the
    training run in out_dir: its best weights, adapters merged), device, dtype (the weights
    are cast to it), compile."""
    import checkpoint
    from common import DTYPES, setup

    source = options["init_from"]
    if source == "resume":
        source = options["out_dir"]
        if not Path(source).expanduser().is_dir():
            raise GrafitoError(f"no training run in out_dir={source}: train one (python train.py "
                               f"config/ruby_002.py) or use another model, e.g. --init_from=gpt2 or "
                               f"--init_from=path/to/model")
    device, dtype = setup(options["device"], options["dtype"])
    model = checkpoint.load_model(source)
    return Engine(model.to(device=device, dtype=DTYPES[dtype]), compile=options["compile"])


def answers(engine, prompts, max_new_tokens, sampling, generator=None, on_text=None, raw=False):
    """Answer texts for chat prompts (token id lists), decoded as one batch; on_text(str)
    streams the first row. raw=True: plain continuations (only end-of-text stops them,
    spaces kept). Returns (texts, steps, seconds)."""
    streams = [tokenizer.AnswerStream(raw=raw) for _ in prompts]
    started, steps = time.perf_counter(), 0
    for tokens in engine.generate(prompts, max_new_tokens, sampling, stop_ids=[tokenizer.EOT], generator=generator,
                                  vocab_limit=tokenizer.VOCAB_SIZE):
        steps += 1
        for i, (stream, token) in enumerate(zip(streams, tokens)):
            text = stream.add(token) if token is not None else ""
            if i == 0 and on_text and text:
                on_text(text)
        if all(s.done for s in streams):
            break
    for i, stream in enumerate(streams):
        if not stream.done:
            text = stream.finish()
            if i == 0 and on_text and text:
                on_text(text)
    return [s.text for s in streams], steps, time.perf_counter() - started
