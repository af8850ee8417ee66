"""Generation: the KV cache, sampling, and the decode loop that sample.py, eval.py and
serve.py all use.

Every row of a batch is a slot of the KV cache holding its own sequence from position 0,
so rows of different lengths need no padding masks, and a row can be (re)filled while the
others go on, which is what continuous batching (Batcher, at the end, for serve.py) does.
A token produces logits only through a decode step: a prompt's tokens but the last are
prefilled (one causal forward), the last one is the first decode step's input.
naive_generate() is the reference the tests hold this loop equal to.
"""

import collections
import contextlib
import copy
import ctypes
import functools
import math
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import checkpoint
import native
import quantize
import tokenizer
from common import DTYPES, GrafitoError, check_memory, setup
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
        self.masked = True  # False: every slot of this decode step holds window - 1 tokens (no mask needed)
        self.kernel = None  # decode steps' attention through csrc/decode_attention.c (Engine sets it on CPUs)
        self.counts = None  # the keys each slot attends in a kernel's decode step (its position + 1; layout() sets it)
        self.static = False  # tensors marked static for CUDA graphs (their views too)
        self._views = {}

    def mark_static(self):
        """Tell torch.compile these tensors keep their storage: CUDA graphs may then update them in place."""
        self.static = True
        for tensor in self.keys + self.values + [self.positions]:
            torch._dynamo.mark_static_address(tensor)

    def first(self, n):
        """Slots 0..n-1 as a cache of n rows sharing this one's tensors and lengths (a decode
        step over the busy slots only; the rows after them must be empty). One view per n,
        made once: a compiled step then sees the same tensors every time."""
        if n == self.batch_size:
            return self
        if n not in self._views:
            view = copy.copy(self)
            view.keys, view.values = [k[:n] for k in self.keys], [v[:n] for v in self.values]
            view.positions, view.batch_size, view._views = self.positions[:n], n, {}
            if self.static:  # views of the same storage: without the mark, torch skips CUDA graphs
                view.mark_static()
            self._views[n] = view
        return self._views[n]

    @property
    def prefilling(self):
        """Whether the forward about to run is a prefill (causal attention over its own tokens)."""
        return self.rows is not None

    def layout(self, T):
        """(positions, attention mask) for the T tokens of the forward about to run."""
        if self.rows is not None:
            return torch.arange(T, device=self.device), None
        if self.kernel is not None:  # what the C kernel reads instead of a mask
            self.counts = self.positions + 1
        if not self.masked:  # every slot at position window - 1: each attends to all window keys
            return self.positions[:, None], None
        key_position = torch.arange(self.window, device=self.device)
        mask = key_position[None, :] <= self.positions[:, None]
        return self.positions[:, None], mask[:, None, None, :]

    def update(self, layer, k, v):
        """Store this forward's keys and values (B, H, T, D); return those attention reads."""
        keys, values = self.keys[layer], self.values[layer]
        if self.rows is not None:
            keys[self.rows, :, :k.shape[2]] = k.to(keys.dtype)
            values[self.rows, :, :v.shape[2]] = v.to(values.dtype)
            return k, v
        if not self.masked:  # one position for all: a plain slice write
            keys[:, :, self.window - 1] = k[:, :, 0]
            values[:, :, self.window - 1] = v[:, :, 0]
        else:  # indexed writes, not scatter_: on a CPU scatter_'s time grows with the whole cache
            slots = torch.arange(k.shape[0], device=self.device)
            keys[slots, :, self.positions] = k[:, :, 0].to(keys.dtype)
            values[slots, :, self.positions] = v[:, :, 0].to(values.dtype)
        return keys[:, :, :self.window], values[:, :, :self.window]

    def attend(self, layer, q):
        """A decode step's attention (B, H, 1, D) for `layer` through the C kernel: each slot's query
        over its own first `counts` keys (a float32 or bf16 cache), in float32 (the kernel skips the
        set-up that dominates PyTorch's attention at one query a head)."""
        q = q.to(torch.float32)
        keys, values = self.keys[layer], self.values[layer]
        B, H, T, D = q.shape
        assert T == 1 and q.stride(3) == 1 and keys.is_contiguous() and values.is_contiguous(), "the kernel's layout"
        out = torch.empty(B, H, 1, D)
        if self.kernel(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(),
                       keys.dtype == torch.bfloat16, keys.stride(0), keys.stride(1), self.counts.data_ptr(),
                       out.data_ptr(), B, H, D, self.window, 1 / math.sqrt(D), torch.get_num_threads()):
            raise MemoryError("decode_attention: out of memory")
        return out


@functools.cache
def decode_attention_kernel():
    """csrc/decode_attention.c's function, or None where it cannot be built (no C compiler):
    decode steps then attend through PyTorch's scaled_dot_product_attention, equally right."""
    try:
        function = native.load("decode_attention").decode_attention
    except GrafitoError:
        return None
    P, I = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [P, I, I, P, P, ctypes.c_int, I, I, P, P, I, I, I, I, ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


# how a chat model answers unless told otherwise: sample.py's, serve.py's and exported models' defaults
CHAT_DEFAULTS = dict(max_new_tokens=200, temperature=0.7, top_k=50, top_p=1.0, repetition_penalty=1.0)


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # the nucleus always keeps the most likely token, however small top_p is
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_options(vars(self), {
            "temperature": (lambda t: t == 0 or 1e-3 <= t <= 100, "0 (greedy) or between 0.001 and 100"),
            "top_k": integer(0), "top_p": (lambda p: 0 < p <= 1, "in (0, 1]"),
            "repetition_penalty": number(0.01, 100.0),
        }, where="sampling")


BAD_LOGITS = -1  # what sample() gives a row whose logits are NaN or infinite
NON_FINITE = ("the model produced NaN or infinite logits; its weights are damaged (or overflow in this dtype: try "
              "--dtype=float32)")


def sample(logits, sampling, seen=None, generators=None):
    """Next token ids (B,) from logits (B, V), every row with its own settings, in one batched pass.

    sampling: one Sampling for every row, or a list of one per row. seen (B, V): the tokens each
    row's repetition penalty pushes down. generators: one torch.Generator for every row, a list
    of one per row (each row then draws from its own only, so a seeded row's tokens do not depend
    on its neighbours), or None (torch's global one). A row whose logits are NaN or infinite
    (from the model, or after its penalty and temperature) gets BAD_LOGITS instead of a token:
    the caller ends that row alone. Every step is row-wise, so a row's token is the same
    whatever else is in the batch. A row with a top_k is drawn among its candidates only (every
    token at least as likely as its top_k-th, ties with it kept): two passes over the vocabulary
    find them, the rest works on those few; rows are grouped by their number of candidates.
    Greedy rows and top_k 0 work on the whole vocabulary.
    """
    B, V = logits.shape
    rows = sampling if isinstance(sampling, list) else [sampling] * B
    logits = logits.float()
    penalties = [s.repetition_penalty for s in rows]
    if seen is not None and any(p != 1.0 for p in penalties):  # CTRL-style; a penalty of 1 changes nothing exactly
        penalty = torch.tensor(penalties, device=logits.device)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = [s.temperature == 0 for s in rows]
    # one uniform draw per row, greedy rows too, before any grouping: each generator advances alike
    draws = None if all(greedy) else uniforms(generators, B, logits.device)
    top_k = [0 if g else min(s.top_k, V) for s, g in zip(rows, greedy)]
    widths, kept, top = [0] * B, None, None
    if any(top_k):
        values = torch.topk(logits, max(top_k), dim=-1).values  # exact copies: a row's values never depend on others
        index = torch.tensor([max(k, 1) - 1 for k in top_k], device=logits.device)[:, None]
        top, kept = values[:, :1], logits >= values.gather(1, index)  # top: NaN first, as max would propagate it
        counts = kept.sum(dim=-1).tolist()
        widths = [n if k else 0 for k, n in zip(top_k, counts)]  # 0 where the k-th is NaN: the full pass flags it
    groups = {}
    for row, width in enumerate(widths):
        groups.setdefault(width, []).append(row)
    if len(groups) == 1:
        return _sample_rows(logits, rows, widths[0], draws, kept, top)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    for width, members in groups.items():
        index = torch.tensor(members, device=logits.device)
        pick = lambda t: None if t is None else t[index]
        tokens[index] = _sample_rows(logits[index], [rows[row] for row in members], width, pick(draws), pick(kept),
                                     pick(top))
    return tokens


def _sample_rows(logits, rows, width, draws, kept, top):
    """sample() for one group of rows: width 0, the whole vocabulary (greedy rows among them); else
    each row's `width` candidates (kept: True for the tokens at least as likely as its k-th), its
    most likely value `top`."""
    per_row = lambda values: torch.tensor(values, dtype=torch.float32, device=logits.device)[:, None]
    greedy = [s.temperature == 0 for s in rows]
    if width:  # the candidates in id order, then most likely first with ties still in id order
        ids = kept.nonzero()[:, 1].view(-1, width)
        logits, order = logits.gather(1, ids).sort(dim=-1, descending=True, stable=True)
        candidates = ids.gather(1, order)
    scale = per_row([s.temperature or 1.0 for s in rows])
    if not all(greedy):
        logits = logits / scale
    best, tokens = ((top / scale)[:, 0], candidates[:, 0]) if width else logits.max(dim=-1)  # NaN propagates into best
    bad = ~torch.isfinite(best)
    if all(greedy):
        return tokens.masked_fill(bad, BAD_LOGITS)
    top_p = [s.top_p if not g and s.top_p < 1 else 2.0 for s, g in zip(rows, greedy)]  # 2: keeps every token
    if any(p < 1 for p in top_p):  # the smallest set of most likely tokens whose mass reaches top_p
        sorted_logits, order = (logits, None) if width else torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= per_row(top_p)
        outside[:, 0] = False  # a top_p that rounds to 0 in float32 keeps the most likely token
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = sorted_logits if width else torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    # inverse transform sampling: the row's uniform draw looked up in its cumulative distribution
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(draws[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))  # below the total: a token of mass > 0
    drawn = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)  # a NaN row: any, flagged
    drawn = candidates.gather(1, drawn)[:, 0] if width else drawn[:, 0]
    tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens, drawn)
    return tokens.masked_fill(bad, BAD_LOGITS)


def uniforms(generators, B, device):
    """B uniform draws in [0, 1): from one generator (or torch's), or one from each row's."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(B, generator=generators, device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


class Engine:
    """A model ready to generate: eval mode, its weights' dtype, and optionally a compiled
    decode step (fixed shapes: the cache length is rounded up to a multiple of 256, so one
    graph serves many prompts). Give it the model already on its device and dtype."""

    def __init__(self, model, compile=False):
        self.model = model.eval()
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        # one-row steps on a CPU in half precision: PyTorch's own matrix-vector kernel where it wins
        half_on_cpu = self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16)
        self.native_one_row = half_on_cpu and native_one_row_is_faster(
            model.config.mlp_width, model.config.n_embd, self.dtype)
        self.compiled = compile
        # eager CPU decode steps attend through the C kernel where it builds (a compiled step cannot call it)
        self.attention_kernel = (decode_attention_kernel() if self.device.type == "cpu" and not compile
                                 and self.dtype in (torch.float32, torch.bfloat16, torch.float16) else None)
        # the cache's dtype: the C kernel reads float32 and bf16 caches as they are; without it, a
        # CPU's half-precision attention kernels run a decode step's few queries several times
        # slower than its float32 ones (docs/performance.md), so the cache is widened
        if self.attention_kernel is not None:
            self.cache_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        else:
            self.cache_dtype = torch.float32 if half_on_cpu else self.dtype
        self._step = self._decode_step
        if compile and self.device.type == "cuda":  # CUDA graphs: small decode steps are launch-bound
            self._step = torch.compile(self._decode_step, dynamic=False, mode="reduce-overhead")
        elif compile:  # not frozen: frozen weights are pre-packed for oneDNN, slow for one row
            self._step = torch.compile(self._decode_step, dynamic=False)

    def new_cache(self, batch_size, tokens):
        """A cache for batch_size rows of up to `tokens` tokens (at most the context)."""
        if self.compiled:  # few distinct shapes, few compilations
            tokens = math.ceil(tokens / 256) * 256
        config = self.model.config
        needed = (2 * config.n_layer * batch_size * min(tokens, config.block_size) * config.n_embd
                  * self.cache_dtype.itemsize)
        check_memory(needed, str(self.device), f"a KV cache for {batch_size} rows", "generate fewer rows at once")
        cache = KVCache(self.model.config, batch_size, min(tokens, self.model.config.block_size), self.device,
                        self.cache_dtype)
        if self.compiled and self.device.type == "cuda":
            cache.mark_static()
        cache.kernel = self.attention_kernel
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
        lengths = cache.lengths[:cache.batch_size]
        cache.window = cache.max_len if self.compiled else max(lengths) + 1
        cache.masked = self.compiled or min(lengths) != max(lengths)
        with onednn_off(self.native_one_row and cache.batch_size == 1):
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
            if any(token == BAD_LOGITS for token, on in zip(tokens, active) if on):
                raise GrafitoError(NON_FINITE)
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
                if token in stop_ids:  # the row's slot is emptied: a full one would push the next step past the context
                    active[row] = False
                    cache.lengths[row] = 0
                    cache.positions[row] = 0
            yield out
            if not any(active):
                return


@functools.cache
def native_one_row_is_faster(rows, cols, dtype):
    """Whether one row times a (rows, cols) half-precision weight runs clearly faster on this
    CPU with oneDNN off (PyTorch's own matrix-vector kernel, which streams the weight once)
    than through oneDNN's GEMM, timed once per shape in this process, in a fraction of a
    second: which one wins depends on the CPU. (The two may round differently in the
    last bits, so bf16 answers can differ by machine.)"""
    copies = max(2, (48 << 20) // (rows * cols * dtype.itemsize))  # more bytes than a cache holds, as in decoding
    weights = [torch.full((rows, cols), 0.01, dtype=dtype) for _ in range(min(copies, 16))]  # no RNG draws
    x = torch.full((1, cols), 0.5, dtype=dtype)
    best = {True: math.inf, False: math.inf}
    with torch.no_grad():
        for _ in range(6):  # alternating rounds, the best of each: a busy moment hurts both alike
            for own_kernel in best:
                with onednn_off(own_kernel):
                    start = time.perf_counter()
                    for weight in weights:
                        F.linear(x, weight)
                    best[own_kernel] = min(best[own_kernel], time.perf_counter() - start)
    return best[True] < 0.9 * best[False]  # a clear win only


@contextlib.contextmanager
def onednn_off(off=True):
    """oneDNN disabled inside; the switch is process-wide, so it wraps only the generating
    thread's decode steps (serve.py's other threads run no products)."""
    if not off:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


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
    are cast to it), compile, quantize (quantize.py: '' or int8, applied to the loaded weights)."""
    if options["init_from"] == "scratch":
        raise GrafitoError("init_from=scratch: generation needs a trained model (a run's out_dir, a GPT-2 name, "
                           "a hub id or a folder)")
    source = checkpoint.model_source(options["init_from"], options["out_dir"])
    device, dtype = setup(options["device"], options["dtype"])
    method = options.get("quantize", "")  # optional: callers that never quantize need not say so
    quantize.check(method, device, options["compile"])
    model = quantize.quantize(checkpoint.load_model(source).eval(), method, DTYPES[dtype])
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


# ----------------------------------------------------------------------------- continuous batching

class QueueFull(Exception):
    """The Batcher's waiting line is full: the caller should come back later."""


class StopStrings:
    """Finds the first of some stop strings in text that arrives piece by piece, in time
    linear in the text: one Knuth-Morris-Pratt automaton per string, fed each new character."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fallback = [self._fallback(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # characters of each string the text ends with
        self.fed = 0  # characters fed so far

    @staticmethod
    def _fallback(s):
        """fallback[i]: the longest proper prefix of s[:i + 1] that is also its suffix."""
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            k += s[i] == s[k]
            table[i] = k
        return table

    def feed(self, text):
        """Where (in all the text fed) the first stop string to be completed starts, or None."""
        for char in text:
            self.fed += 1
            found = None
            for j, (s, table) in enumerate(zip(self.stops, self.fallback)):
                k = self.matched[j]
                while k and s[k] != char:
                    k = table[k - 1]
                k += s[k] == char
                if k == len(s):
                    found = min(found if found is not None else self.fed, self.fed - k)  # ties: the longest
                    k = table[k - 1]
                self.matched[j] = k
            if found is not None:
                return found
        return None

    def held(self):
        """Characters at the end of the text that may be the start of a stop string."""
        return max(self.matched, default=0)


class Job:
    """One request the Batcher answers: a prompt (token ids), its own sampling settings, stop
    strings and seed, and deliver(text, finish_reason), which the engine thread calls with each
    new piece of the answer. finish_reason stays None until the last call: 'stop' (end-of-text,
    a template marker or a stop string), 'length' (max_new_tokens reached), or 'error' (text is
    then the message). raw=True continues plain text (only end-of-text stops it)."""

    def __init__(self, prompt, max_new_tokens, sampling, deliver, stop=(), seed=None, raw=False):
        if not prompt:
            raise ValueError("a job needs at least one prompt token")
        self.prompt, self.max_new_tokens, self.sampling = list(prompt), max_new_tokens, sampling
        self.deliver, self.seed = deliver, seed
        self.stop = StopStrings(stop)
        self.stream = tokenizer.AnswerStream(raw=raw)
        self.text = ""  # the answer so far, cut at a stop string once one appears
        self.sent = 0  # characters of text already delivered
        self.generated = 0  # tokens sampled, the one that ended the answer included
        self.finish_reason = None
        self.cancelled = False
        # set by the engine thread when the job takes a slot
        self.history, self.generator = None, None

    def take(self, token):
        """Record one generated token and deliver the text it completes; True when the job is done."""
        self.generated += 1
        new = self.stream.add(token)
        if self.stream.done:
            self.finish_reason = "stop"
        elif self.generated == self.max_new_tokens:
            new += self.stream.finish()
            self.finish_reason = "length"
        self.text += new
        cut = self.stop.feed(new)  # undelivered text never holds a stop string's start: held() keeps it back
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
        end = len(self.text) if self.finish_reason else len(self.text) - self.stop.held()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        if piece or self.finish_reason:
            self.send(piece, self.finish_reason)
        return self.finish_reason is not None

    def send(self, text, finish_reason):
        try:
            self.deliver(text, finish_reason)
        except Exception:  # whoever listened is gone (its event loop closed): stop working for it
            self.cancelled = True


def describe(err):
    """An exception as the one line a job's client is told (a traceback in the log when unexpected)."""
    if isinstance(err, GrafitoError):
        return str(err)
    traceback.print_exception(err)
    return f"{type(err).__name__}: {err}"


class Batcher:
    """Continuous batching: one engine thread owns the model and answers many Jobs at once.

    Every busy slot is a row of one KV cache (rows 0..n-1: a freed row is filled by the last
    busy one, so a decode step runs over exactly the busy rows). Each step decodes one token
    for every busy slot and samples all of them in one batched call; a new job is prefilled
    into a free row and joins at the next step; a finished or cancelled job leaves at once.
    Each slot keeps its own sampling settings, stop strings, torch.Generator (its seed) and
    positions, so a job's tokens do not depend on the others: in float32, greedy answers
    equal Engine.generate's for the prompt alone. A failure that belongs to one job (a bad
    prompt, NaN logits in its row, its stop strings or client) ends that job alone; only a
    failed decode step, which is everyone's, ends them all.
    At most max_batch slots; up to max_queue more jobs wait, beyond that submit() refuses.
    With a compiled engine, each decode step runs over a power of two of rows (few graphs),
    and start() compiles every one of those sizes before the first job.
    """

    def __init__(self, engine, max_batch=16, max_queue=64):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        config = engine.model.config
        self.block_size, self.vocab_size = config.block_size, config.vocab_size
        self.cache = engine.new_cache(max_batch, self.block_size)
        self.seen = torch.zeros(max_batch, config.vocab_size, dtype=torch.bool, device=engine.device)  # penalty marks
        self.sizes = sorted({self.rows_for(n) for n in range(1, max_batch + 1)})  # decode step sizes
        if engine.compiled:  # one graph per size: past torch's recompile limit it would silently run eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.sizes) + 1)
        self.slots = []  # the busy jobs, slot i in cache row i (the engine thread's alone)
        self.waiting = collections.deque()
        self.peak_busy = 0  # the most slots ever busy at once
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="grafito-engine", daemon=True)

    def rows_for(self, n):
        """The rows a decode step over n busy slots runs on."""
        return n if not self.engine.compiled else min(self.max_batch, 1 << (n - 1).bit_length())

    def start(self):
        if self.engine.compiled:
            self.warm_up()
        self._thread.start()
        return self

    @torch.no_grad()
    def warm_up(self):
        """Compile the decode step for every size now, not on the first request that needs it
        (which would stall every stream). No slot is busy: the steps move nothing."""
        runs = 2 if self.engine.device.type == "cuda" else 1  # CUDA graphs are recorded on the second run
        for rows in self.sizes:
            for _ in range(runs):
                self.engine.decode(self.cache.first(rows), [0] * rows, [False] * rows)

    def close(self, timeout=30, message="the server is shutting down"):
        """Stop the engine thread; jobs still running or waiting end with an error."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        for job in self.slots + list(self.waiting):
            job.send(message, "error")
        self.slots, self.waiting = [], collections.deque()

    def submit(self, job):
        with self._wake:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.slots)} requests are being answered and {len(self.waiting)} are "
                                f"waiting, the most this server queues; try again shortly")
            self.waiting.append(job)
            self._wake.notify()

    def cancel(self, job):
        """The job's client went away: it leaves the queue, or its slot at the next step."""
        with self._wake:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)

    @property
    def busy(self):
        return len(self.slots)

    def _run(self):
        while True:
            with self._wake:
                while not self.slots and not self.waiting and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.slots)))]
            try:
                self.step(new)
            except Exception as err:  # the decode step failed (out of memory...): it was every job's
                message = describe(err)
                for job in dict.fromkeys(self.slots + new):
                    job.send(message, "error")
                self.slots = []
                self.cache.lengths[:] = [0] * self.max_batch  # in place: the cache's views share the list
                self.cache.positions.zero_()

    @torch.no_grad()
    def step(self, new=()):
        """One step of every busy slot, after admitting `new` jobs into free rows."""
        cache = self.cache
        # 1. jobs whose client went away leave at once
        for row in reversed(range(len(self.slots))):
            if self.slots[row].cancelled:
                self._leave(row)
        # 2. new jobs take the next rows
        self._admit([job for job in new if not job.cancelled and self._prepare(job)])
        # 3. a slot whose context is full restarts from its recent tokens, alone (as Engine.generate)
        for row in reversed(range(len(self.slots))):
            job = self.slots[row]
            if cache.lengths[row] == cache.max_len:
                keep = max(self.block_size // 2, self.block_size - (job.max_new_tokens - job.generated))
                try:
                    self.engine.prefill(cache, [row], [job.history[-keep:-1]])
                except Exception as err:
                    job.send(describe(err), "error")
                    self._leave(row)
        n = len(self.slots)
        if not n:
            return
        # 4. one decode step over the busy rows (a compiled step over a power of two of them: few graphs)
        rows = self.rows_for(n)
        tokens = [job.history[-1] for job in self.slots] + [0] * (rows - n)
        active = None if rows == n else [True] * n + [False] * (rows - n)
        logits = self.engine.decode(cache.first(rows), tokens, active)[:n]
        if logits.shape[-1] > tokenizer.VOCAB_SIZE:  # rows the tokenizer cannot decode
            logits[:, tokenizer.VOCAB_SIZE:] = float("-inf")
        # 5. every slot samples with its own settings and generator, in one call and one transfer
        penalized = any(job.sampling.repetition_penalty != 1.0 for job in self.slots)
        picks = sample(logits, [job.sampling for job in self.slots], self.seen[:n] if penalized else None,
                       [job.generator for job in self.slots])
        if penalized:
            self.seen[torch.arange(n, device=picks.device), picks.clamp(min=0)] = True
        picks = picks.tolist()
        # 6. record each token, deliver the text, and free the rows of finished (or failed) jobs
        for row in reversed(range(n)):
            job, token = self.slots[row], picks[row]
            try:
                if token == BAD_LOGITS:
                    raise GrafitoError(NON_FINITE)
                job.history.append(token)
                del job.history[:-self.block_size]
                done = job.take(token)
            except Exception as err:
                job.send(describe(err), "error")
                done = True
            if done or job.cancelled:
                self._leave(row)

    def _prepare(self, job):
        """A new job's own state (history, generator); False if it cannot run: it ended with an error."""
        try:
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in job.prompt):
                raise GrafitoError(f"the prompt holds token ids outside the model's vocabulary (0 to "
                                   f"{self.vocab_size - 1})")
            job.history = job.prompt[-(self.block_size - 1):]
            job.generator = torch.Generator(device=self.engine.device)
            job.generator.manual_seed(job.seed) if job.seed is not None else job.generator.seed()
            return True
        except Exception as err:
            job.send(describe(err), "error")
            return False

    def _admit(self, jobs):
        """Jobs take the next free rows: all but each prompt's last token prefilled together (that
        one is the first decode step's input). If that fails, each is prefilled alone, so a job
        that cannot be ends alone."""
        groups = [jobs] if jobs else []
        while groups:
            group = groups.pop()
            rows = list(range(len(self.slots), len(self.slots) + len(group)))
            try:
                self.engine.prefill(self.cache, rows, [job.history[:-1] for job in group])
            except Exception as err:
                if len(group) > 1:
                    groups += [[job] for job in reversed(group)]
                else:
                    group[0].send(describe(err), "error")
                continue
            for row, job in zip(rows, group):
                if job.sampling.repetition_penalty != 1.0:
                    self.seen[row] = False
                    self.seen[row, job.history] = True
            self.slots += group
        self.peak_busy = max(self.peak_busy, len(self.slots))

    def _leave(self, row):
        """Free a row: the last busy slot moves into it, so busy rows stay 0..n-1."""
        cache, last = self.cache, len(self.slots) - 1
        if row != last:
            length = cache.lengths[last]
            for layer in cache.keys + cache.values:
                layer[row, :, :length] = layer[last, :, :length]
            cache.positions[row] = cache.positions[last]
            cache.lengths[row] = length
            self.seen[row] = self.seen[last]
            self.slots[row] = self.slots[last]
        self.slots.pop()
        cache.lengths[last] = 0
        cache.positions[last] = 0
