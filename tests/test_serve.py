"""serve.py and engine.Batcher: continuous batching equals answering alone, and the server
through the real openai client: answers, usage, stops, every bad input, auth, limits,
disconnects, the queue, the command. Servers run on 127.0.0.1 in a daemon thread (or a child
process) and stop with their test."""

import contextlib
import copy
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import engine
import serve
import tokenizer
from conftest import ROOT
from model import GPT, GPTConfig
from test_engine import attention_decides

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

GREEDY = engine.Sampling(temperature=0)
BLOCK = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    attention_decides(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    """The engine sample.py would build for the same weights (float32), to answer alone."""
    return engine.Engine(GPT.from_pretrained(model_dir))


def solo(reference, messages, max_tokens):
    """(answer, tokens generated, prompt tokens) for the conversation answered alone, as sample.py does."""
    history, instruction = tokenizer.turns_from_messages(messages)
    ids, _, _ = tokenizer.fit_prompt(history, instruction, tokenizer.prompt_budget(BLOCK, max_tokens))
    texts, steps, _ = engine.answers(reference, [ids], max_tokens, GREEDY)
    return texts[0], steps, len(ids)


def ask(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- servers for the tests

def slowed(delay):
    """A loader whose engine sleeps before every decode step: requests then overlap for sure."""
    def load(config):
        model_engine = engine.load_engine(config)
        decode = model_engine.decode

        def slow_decode(*args, **kwargs):
            time.sleep(delay)
            return decode(*args, **kwargs)

        model_engine.decode = slow_decode
        return model_engine
    return load


class Running:
    def __init__(self, app, port):
        self.app, self.url = app, f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def client(self, key="none", **options):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30, **options)

    def health(self):
        return self.http.get("/health").json()

    def wait_until(self, condition, seconds=15):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if condition(self.health()):
                return True
            time.sleep(0.02)
        raise AssertionError(f"not reached in {seconds} s: {self.health()}")


@contextlib.contextmanager
def running(model_dir, load=engine.load_engine, wait=True, **options):
    """serve.create_app on a free port of 127.0.0.1, in a daemon thread that ends with the block."""
    config = {**serve.DEFAULTS, "init_from": str(model_dir), "device": "cpu", "dtype": "float32",
              "log_level": "warning", **options}
    app = serve.create_app(config, load)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = serve.Server(app, config, grace_seconds=1)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    run = Running(app, sock.getsockname()[1])
    run.server = server
    try:
        if wait:
            run.wait_until(lambda h: h["status"] == "ok", seconds=60)
        yield run
    finally:
        run.http.close()
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir):
    with running(model_dir) as run:
        yield run


@pytest.fixture(scope="module")
def slow_server(model_dir):
    with running(model_dir, load=slowed(0.02)) as run:
        yield run


# ----------------------------------------------------------------------------- the batcher, driven step by step

class CheckedEngine:
    """The reference engine, with every decode step of a Batcher checked against the sequences
    alone: each busy slot's next-token logits equal a plain forward of the tokens its cache
    should hold (float32, tight tolerance). check(batcher) then checks the bookkeeping."""

    def __init__(self, reference):
        self.model, self.inner = reference.model, reference
        self.device, self.dtype, self.compiled = reference.device, reference.dtype, reference.compiled
        self.batcher, self.steps_checked = None, 0

    def new_cache(self, *args):
        return self.inner.new_cache(*args)

    def prefill(self, *args):
        return self.inner.prefill(*args)

    def decode(self, cache, tokens, active=None):
        held = [(list(job.history), self.batcher.cache.lengths[row]) for row, job in enumerate(self.batcher.slots)]
        logits = self.inner.decode(cache, tokens, active)
        for row, (history, length) in enumerate(held):
            sequence = torch.tensor([history[-(length + 1):]])  # what the cache holds, and this step's input
            with torch.no_grad():
                alone = self.model.logits(self.model.hidden_states(sequence)[:, -1])[0]
            assert (logits[row] - alone).abs().max() < 1e-5, f"slot {row}"  # float32 rounding stays far below
        self.steps_checked += 1
        return logits

    @staticmethod
    def check(batcher):
        """Busy rows' lengths equal their positions (the cache's fill); the rows after them are empty."""
        cache, n = batcher.cache, batcher.busy
        assert cache.lengths[:n] == cache.positions[:n].tolist()
        for row, job in enumerate(batcher.slots):
            if len(job.prompt) + job.generated < BLOCK:  # no restart yet: all of its history but the next input
                assert cache.lengths[row] == len(job.history) - 1
        assert cache.lengths[n:] == [0] * (batcher.max_batch - n) and not cache.positions[n:].any()


def checked_batcher(reference, max_batch=8):
    checked = CheckedEngine(reference)
    checked.batcher = engine.Batcher(checked, max_batch=max_batch)
    return checked.batcher


def batcher_answers(reference, prompts, max_tokens, arrivals, sampling=GREEDY, seeds=None, max_batch=8):
    """Answers of jobs that join a Batcher at the given steps (no thread: step() by hand), its
    invariants checked at every step."""
    batcher = checked_batcher(reference, max_batch)
    results = [[] for _ in prompts]
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    jobs = [engine.Job(p, n, s, lambda text, finish, out=out: out.append((text, finish)),
                       seed=seeds[i] if seeds else None)
            for i, (p, n, s, out) in enumerate(zip(prompts, max_tokens, samplings, results))]
    step = 0
    while any(not out or not out[-1][1] for out in results):
        batcher.step([job for job, arrival in zip(jobs, arrivals) if arrival == step])
        CheckedEngine.check(batcher)
        step += 1
        assert step < 2000
    return ["".join(text for text, _ in out) for out in results], jobs, batcher


def prompts_of(n):
    return [tokenizer.render_prompt([], f"question {i}: " + "tell me more " * i) for i in range(n)]


_alone = {}


def answer_alone(reference, prompt, max_tokens):
    key = (tuple(prompt), max_tokens)
    if key not in _alone:
        _alone[key] = engine.answers(reference, [prompt], max_tokens, GREEDY)[0][0]
    return _alone[key]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_batched_greedy_answers_equal_each_answer_alone_whatever_the_arrival_order(reference, order):
    prompts, max_tokens = prompts_of(6), [8, 30, 4, 40, 16, 24]
    arrivals = [[0, 0, 0, 0, 0, 0], [0, 3, 3, 9, 17, 30], [30, 17, 9, 3, 3, 0]][order]
    answers, _, batcher = batcher_answers(reference, prompts, max_tokens, arrivals)
    for prompt, n, answer in zip(prompts, max_tokens, answers):
        assert answer == answer_alone(reference, prompt, n)
    assert batcher.busy == 0 and batcher.peak_busy >= 3
    assert len(set(answers)) == len(answers)  # the model reads its prompt: a mixed-up cache would show


def test_a_slot_whose_context_fills_restarts_as_generate_does(reference):
    prompts = prompts_of(3)
    max_tokens = [170, 10, 130]  # past the 128-token context: rows restart from their recent tokens
    answers, _, _ = batcher_answers(reference, prompts, max_tokens, [0, 2, 5])
    for prompt, n, answer in zip(prompts, max_tokens, answers):
        assert answer == answer_alone(reference, prompt, n)


def test_each_slot_samples_with_its_own_seed_as_sample_py_would(reference):
    prompts, hot = prompts_of(3), engine.Sampling(temperature=1.0, top_k=40, repetition_penalty=1.3)
    answers, _, _ = batcher_answers(reference, prompts, [12] * 3, [0, 1, 4], sampling=hot, seeds=[7, 8, 7])
    for prompt, seed, answer in zip(prompts, [7, 8, 7], answers):
        generator = torch.Generator().manual_seed(seed)  # sample.py --seed: one generator, one sample
        assert answer == engine.answers(reference, [prompt], 12, hot, generator)[0][0]
    assert answers[0] != answers[2]  # the same seed on different prompts


def test_a_cancelled_job_leaves_at_once_and_the_others_go_on_unchanged(reference):
    prompts = prompts_of(3)
    batcher = engine.Batcher(reference, max_batch=4)
    outs = [[] for _ in prompts]
    jobs = [engine.Job(p, 30, GREEDY, lambda text, finish, out=out: out.append((text, finish))) for p, out in
            zip(prompts, outs)]
    batcher.step(jobs)
    batcher.step()
    batcher.cancel(jobs[0])
    batcher.step()
    assert batcher.busy == 2 and jobs[0].generated == 2  # gone before its third token
    while batcher.busy:
        batcher.step()
    for prompt, out in zip(prompts[1:], outs[1:]):
        assert "".join(t for t, _ in out) == answer_alone(reference, prompt, 30)


def test_stop_strings_are_found_where_a_plain_search_finds_them():
    """The incremental matcher against str.find and str.endswith, on text fed in random pieces."""
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("aab") for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        ends = [text.find(s) + len(s) for s in stops if s in text]  # the first stop string to be completed
        expected = min(ends) - max(len(s) for s in stops if s in text and text.find(s) + len(s) == min(ends)) \
            if ends else None
        matcher, fed, found = engine.StopStrings(stops), "", None
        for piece in pieces:
            found = matcher.feed(piece)
            fed += piece
            if found is not None:
                break
            assert matcher.held() == max((k for s in stops for k in range(1, len(s)) if fed.endswith(s[:k])),
                                         default=0)
        assert found == expected, (stops, text, pieces)


def test_stop_strings_are_held_back_until_they_are_ruled_out(reference):
    pieces = []
    job = engine.Job([1], 100, GREEDY, lambda text, finish: pieces.append((text, finish)), stop=["t sa", "zzz"])
    tokens = tokenizer.encode(" The cat sat on the mat")
    for count, token in enumerate(tokens, start=1):
        if job.take(token):
            break
    assert "".join(t for t, _ in pieces) == "The ca" and pieces[-1][1] == "stop"
    assert tokenizer.decode(tokens[:count]).endswith(" sat")  # stopped by the token that completed "t sa"
    assert all("t" not in text[-1:] for text, finish in pieces if not finish)  # "t" waited


def run_jobs(batcher, arrivals, steps=2000):
    """Step a batcher by hand, jobs joining at their steps, its invariants checked after every step."""
    for step in range(steps):
        batcher.step([job for job, arrival in arrivals if arrival == step])
        CheckedEngine.check(batcher)
        if step > max(arrival for _, arrival in arrivals) and not batcher.busy:
            return
    raise AssertionError("the jobs did not finish")


def recorded(prompt, max_tokens, sampling=GREEDY, **options):
    out = []
    job = engine.Job(prompt, max_tokens, sampling, lambda text, finish: out.append((text, finish)), **options)
    job.out = out
    return job


def test_a_poisoned_request_ends_alone_and_its_neighbours_answer_as_alone(reference):
    """Every way one job can fail inside the engine ends that job alone, never its neighbours."""
    prompts = prompts_of(3)
    neighbours = [recorded(p, 30) for p in prompts]
    nan_temperature = engine.Sampling(temperature=0.7)
    nan_temperature.temperature = float("nan")  # past validation: its logits turn NaN in the batched sampler
    poisoned = {
        "NaN logits": recorded(prompts[0], 10, nan_temperature),
        "a seed torch refuses": recorded(prompts[1], 10, engine.Sampling(temperature=0.7), seed=2 ** 70),
        "token ids outside the vocabulary": recorded([5, 10 ** 6, 7], 10),
        "its stop-string check raises": recorded(prompts[2], 10, stop=["x"]),
    }
    poisoned["its stop-string check raises"].stop.feed = lambda text: 1 / 0
    leaver = recorded(prompts[1], 10)
    leaver.send = lambda text, finish: setattr(leaver, "cancelled", True)  # its client is gone
    tiny_top_p = recorded(prompts[2], 20, engine.Sampling(temperature=0.9, top_p=1e-300))  # 0 in float32
    batcher = checked_batcher(reference)
    run_jobs(batcher, [(neighbours[0], 0), (neighbours[1], 0), (neighbours[2], 2), (leaver, 2), (tiny_top_p, 3)]
             + [(job, 3 + i) for i, job in enumerate(poisoned.values())])
    for prompt, job in zip(prompts, neighbours):
        assert "".join(text for text, _ in job.out) == answer_alone(reference, prompt, 30)
    for why, job in poisoned.items():
        assert job.out[-1][1] == "error", why
    assert "NaN or infinite" in poisoned["NaN logits"].out[-1][0] and "vocabulary" in poisoned[
        "token ids outside the vocabulary"].out[-1][0]
    assert leaver.cancelled and leaver.generated == 1
    assert "".join(text for text, _ in tiny_top_p.out) == answer_alone(reference, prompts[2], 20)  # the top token
    assert batcher.engine.steps_checked > 30


def test_a_row_whose_own_logits_turn_nan_ends_alone(reference):
    """A damaged position embedding poisons only the rows that reach that position."""
    damaged = copy.deepcopy(reference.model)
    with torch.no_grad():
        damaged.transformer.wpe.weight[100] = float("nan")
    short, long = prompts_of(2)[0], tokenizer.render_prompt([], "a much longer question " * 12)
    assert len(short) + 30 < 100 < len(long) + 60
    batcher = engine.Batcher(engine.Engine(damaged), max_batch=4)
    jobs = [recorded(short, 30), recorded(long, 60), recorded(short[:-3] + short[-2:], 30)]
    run_jobs(batcher, [(job, 0) for job in jobs])
    assert jobs[1].out[-1][1] == "error" and "NaN" in jobs[1].out[-1][0]
    assert "".join(text for text, _ in jobs[0].out) == answer_alone(reference, short, 30)
    assert "".join(text for text, _ in jobs[2].out) == answer_alone(reference, short[:-3] + short[-2:], 30)


def test_a_model_failure_ends_every_job_with_an_error(reference):
    torch.manual_seed(0)
    broken = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK))
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    batcher = engine.Batcher(engine.Engine(broken), max_batch=2).start()
    outs, done = [[], []], threading.Event()

    def deliver(out):
        return lambda text, finish: (out.append((text, finish)), all(o and o[-1][1] for o in outs) and done.set())

    for out in outs:
        batcher.submit(engine.Job([1, 2, 3], 5, GREEDY, deliver(out)))
    assert done.wait(10)
    batcher.close()
    assert [out[-1][1] for out in outs] == ["error", "error"] and "NaN" in outs[0][-1][0]


def test_the_queue_refuses_jobs_beyond_max_queue(reference):
    batcher = engine.Batcher(reference, max_batch=1, max_queue=2)  # not started: jobs stay queued
    for _ in range(2):
        batcher.submit(engine.Job([1], 5, GREEDY, lambda *a: None))
    with pytest.raises(engine.QueueFull, match="waiting"):
        batcher.submit(engine.Job([1], 5, GREEDY, lambda *a: None))


# ----------------------------------------------------------------------------- answers through the openai client

def test_a_served_greedy_answer_equals_the_answer_alone_with_its_usage(server, reference):
    messages = ask("what is the capital of france")
    expected, steps, prompt_tokens = solo(reference, messages, 24)
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason == ("length" if steps == 24 else "stop")
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, steps,
                                                                                  prompt_tokens + steps)


def test_a_streamed_answer_comes_in_openai_chunks_and_equals_the_answer_alone(server, reference):
    messages = ask("name three rivers")
    expected, steps, prompt_tokens = solo(reference, messages, 30)
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert all(pieces) and "".join(pieces) == expected
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == steps
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_the_served_greedy_answer_is_sample_pys(server, model_dir):
    question = "how do plants grow"
    result = subprocess.run([sys.executable, "sample.py", f"--init_from={model_dir}", f"--start={question}",
                             "--max_new_tokens=20", "--temperature=0", "--device=cpu", "--dtype=float32"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    reply = server.client().chat.completions.create(model="tiny", messages=ask(question), max_tokens=20,
                                                    temperature=0)
    assert reply.choices[0].message.content + "\n" == result.stdout


def test_a_seed_gives_sample_pys_sampled_answer(server, reference):
    settings = dict(temperature=0.9, top_p=0.9, top_k=30)
    ids = tokenizer.render_prompt([], "tell me a story")
    generator = torch.Generator().manual_seed(1234)
    expected = engine.answers(reference, [ids], 16, engine.Sampling(**settings), generator)[0][0]
    client = server.client()
    replies = [client.chat.completions.create(model="tiny", messages=ask("tell me a story"), max_tokens=16, seed=seed,
                                              temperature=0.9, top_p=0.9, extra_body={"top_k": 30})
               for seed in (1234, 1234, 99)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content == expected
    assert replies[2].choices[0].message.content != expected


def test_stop_strings_end_the_answer_before_them_streamed_or_not(server, reference):
    full, _, _ = solo(reference, ask("list some colours"), 30)
    stop = full[len(full) // 2:len(full) // 2 + 4]
    expected = full[:full.index(stop)]
    client = server.client()
    options = dict(model="tiny", messages=ask("list some colours"), max_tokens=30, temperature=0,
                   stop=["never appears", stop])
    whole = client.chat.completions.create(**options)
    streamed = list(client.chat.completions.create(**options, stream=True))
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_system_message_is_folded_into_the_first_instruction(server, reference):
    messages = [{"role": "system", "content": "You are terse."}, *ask("why is the sky blue")]
    expected = engine.answers(reference, [tokenizer.render_prompt([], "You are terse.\n\nwhy is the sky blue")], 15,
                              GREEDY)[0][0]
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert reply.choices[0].message.content == expected


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(server, reference):
    messages = []
    for i in range(8):
        messages += [{"role": "user", "content": f"question {i} about a long topic"},
                     {"role": "assistant", "content": f"answer {i} with several words in it"}]
    messages += ask("and the last question")
    expected, _, _ = solo(reference, messages, 20)
    raw = server.client().chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=20,
                                                                    temperature=0)
    reply = raw.parse()
    history, instruction = tokenizer.turns_from_messages(messages)
    _, kept, _ = tokenizer.fit_prompt(history, instruction, tokenizer.prompt_budget(BLOCK, 20))
    dropped = len(history) - len(kept)
    assert dropped > 0 and reply.model_extra["dropped_turns"] == dropped
    assert raw.headers["x-dropped-turns"] == str(dropped)
    assert reply.choices[0].message.content == expected


def test_completions_continue_plain_text_as_sample_py_raw(server, reference):
    prompt = "Once upon a time there was"
    expected = engine.answers(reference, [tokenizer.encode(prompt)], 12, GREEDY, raw=True)[0][0]
    client = server.client()
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert reply.usage.completion_tokens == 12 and streamed[-1].choices[0].finish_reason == "length"


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


# ----------------------------------------------------------------------------- bad input: status, OpenAI's error shape

def long_messages(count, chars):
    return [{"role": ["user", "assistant"][i % 2], "content": "a" * chars} for i in range(count - 1)] + \
        [{"role": "user", "content": "a" * chars}]


BAD_REQUESTS = [  # (name, path, body (bytes are sent as they are), status, param or code named in the error)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("NaN", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, "invalid_json"),
    ("messages missing", "/v1/chat/completions", {}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("content not text", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("temperature a string", "/v1/chat/completions", {"messages": ask("hi"), "temperature": "hot"}, 400, "temperature"),
    ("temperature below 0", "/v1/chat/completions", {"messages": ask("hi"), "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", {"messages": ask("hi"), "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "/v1/chat/completions", {"messages": ask("hi"), "top_p": 1.5}, 400, "top_p"),
    ("max_tokens 0", "/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens above the cap", "/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 5000}, 400,
     "max_tokens"),
    ("max_tokens a float", "/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 2.5}, 400, "max_tokens"),
    ("negative seed", "/v1/chat/completions", {"messages": ask("hi"), "seed": -1}, 400, "seed"),
    ("empty stop string", "/v1/chat/completions", {"messages": ask("hi"), "stop": [""]}, 400, "stop"),
    ("five stop strings", "/v1/chat/completions", {"messages": ask("hi"), "stop": list("abcde")}, 400, "stop"),
    ("a stop string too long", "/v1/completions", {"prompt": "hi", "stop": ["ab", "a" * 200_000]}, 400, "stop"),
    ("n above 1", "/v1/chat/completions", {"messages": ask("hi"), "n": 2}, 400, "n"),
    ("logprobs", "/v1/chat/completions", {"messages": ask("hi"), "logprobs": True}, 400, "logprobs"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("empty message", "/v1/chat/completions", {"messages": ask("   ")}, 400, "invalid_messages"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "invalid_messages"),
    ("turns do not alternate", "/v1/chat/completions", {"messages": ask("a") + ask("b")}, 400, "invalid_messages"),
    ("ends with an answer", "/v1/chat/completions",
     {"messages": ask("a") + [{"role": "assistant", "content": "b"}]}, 400, "invalid_messages"),
    ("too many messages", "/v1/chat/completions", {"messages": long_messages(501, 1)}, 400, "too_many_messages"),
    ("message too long", "/v1/chat/completions", {"messages": ask("a" * 8001)}, 400, "message_too_long"),
    ("conversation too long", "/v1/chat/completions", {"messages": long_messages(5, 7000)}, 400,
     "conversation_too_long"),
    ("prompt cannot fit the context", "/v1/chat/completions", {"messages": ask("word " * 200)}, 400,
     "context_length_exceeded"),
    ("completion prompt missing", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("completion prompt too long", "/v1/completions", {"prompt": "word " * 200}, 400, "context_length_exceeded"),
    ("two completion prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
]


@pytest.mark.parametrize("name, path, body, status, named", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_openais_error_shape(server, name, path, body, status, named):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = server.http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"] and error["type"] == "invalid_request_error"
    assert named in (error["param"], error["code"]), error


def test_the_openai_client_raises_its_bad_request_error_with_the_reason(server):
    with pytest.raises(openai.BadRequestError, match="temperature") as caught:
        server.client().chat.completions.create(model="tiny", messages=ask("hi"), temperature=5)
    assert caught.value.status_code == 400 and caught.value.code == "invalid_value"


def test_a_body_that_is_not_json_is_refused_with_415(server):
    response = server.http.post("/v1/chat/completions", content=b"messages=hi",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_refused_with_413(server, chunked):
    body = json.dumps({"messages": ask("a" * 1_100_000)}).encode()
    content = iter([body[:500_000], body[500_000:]]) if chunked else body  # chunked: no Content-Length
    response = server.http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_paths_and_methods_answer_in_openais_shape(server):
    assert server.http.get("/v1/nothing").json()["error"]["code"] == "http_404"
    assert server.http.get("/v1/chat/completions").json()["error"]["code"] == "http_405"


def test_another_host_name_is_refused_on_a_loopback_server(server):
    assert server.http.get("/health", headers={"Host": "attacker.example"}).status_code == 400


def test_cors_is_closed_unless_cors_origins_opens_it(server, model_dir):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    assert "access-control-allow-origin" not in server.http.options("/v1/chat/completions", headers=preflight).headers
    with running(model_dir, cors_origins="http://app.example") as opened:
        response = opened.http.options("/v1/chat/completions", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://app.example"


def test_an_api_key_is_required_on_v1_when_set(model_dir):
    with running(model_dir, api_key="s3cret") as keyed:
        with pytest.raises(openai.AuthenticationError):
            keyed.client(key="wrong").models.list()
        assert keyed.http.get("/v1/models").status_code == 401
        assert keyed.http.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
        assert keyed.client(key="s3cret").chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=2)
        assert keyed.http.get("/health").status_code == 200 and keyed.http.get("/").status_code == 200


def test_health_is_503_while_the_model_loads_then_200(model_dir):
    release = threading.Event()

    def load(config):
        assert release.wait(30)
        return engine.load_engine(config)

    with running(model_dir, load=load, wait=False) as loading:
        assert loading.http.get("/health").status_code == 503 and loading.health()["status"] == "loading"
        response = loading.http.post("/v1/chat/completions", json={"messages": ask("hi")})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_loading"
        release.set()
        loading.wait_until(lambda h: h["status"] == "ok")


def test_the_page_is_one_self_contained_file_served_at_the_root(server):
    response = server.http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "/v1/chat/completions" in page and "<script src" not in page and "<link" not in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page  # model text only as textContent


# ----------------------------------------------------------------------------- concurrency

def test_eight_concurrent_greedy_streams_equal_their_answers_alone(slow_server, reference):
    questions = [f"question number {i}: " + "and more " * (i % 4) for i in range(8)]
    lengths = [8, 40, 16, 64, 24, 4, 48, 32]
    client, delays = slow_server.client(), random.Random(0).sample([0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3], 8)

    def stream(i):
        time.sleep(delays[i])  # arrivals in a shuffled order while others decode
        chunks = client.chat.completions.create(model="tiny", messages=ask(questions[i]), max_tokens=lengths[i],
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream, range(8)))
    for question, n, answer in zip(questions, lengths, answers):
        assert answer == solo(reference, ask(question), n)[0]
    assert slow_server.health()["peak_busy"] >= 4


def test_a_client_that_leaves_a_stream_frees_its_slot_and_the_next_request_runs_at_once(slow_server):
    client = slow_server.client()
    stream = client.chat.completions.create(model="tiny", messages=ask("talk for a long time"), max_tokens=4000,
                                            temperature=0, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    assert slow_server.health()["busy"] == 1
    stream.close()
    slow_server.wait_until(lambda h: h["busy"] == 0, seconds=5)  # 4000 tokens would take 80 s
    started = time.time()
    assert client.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=5).choices
    assert time.time() - started < 5


def test_a_client_that_leaves_a_whole_answer_frees_its_slot(slow_server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow_server.url + "/v1/chat/completions", timeout=0.5,
                   json={"messages": ask("talk for a long time"), "max_tokens": 4000})
    slow_server.wait_until(lambda h: h["busy"] == 0, seconds=5)


def test_requests_beyond_the_queue_limit_get_503(model_dir):
    with running(model_dir, load=slowed(0.05), max_batch=1, max_queue=1) as busy:
        client = busy.client()
        first = client.chat.completions.create(model="tiny", messages=ask("one"), max_tokens=4000, stream=True)
        next(iter(first))
        waiting = ThreadPoolExecutor(1).submit(lambda: client.chat.completions.create(
            model="tiny", messages=ask("two"), max_tokens=3))
        busy.wait_until(lambda h: h["busy"] == 1 and h["queued"] == 1)
        response = busy.http.post("/v1/chat/completions", json={"messages": ask("three")})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "server_overloaded"
        first.close()
        assert waiting.result(timeout=10).choices[0].finish_reason == "length"  # the queued one ran next


def test_a_request_whose_top_p_vanishes_in_float32_does_not_touch_the_streams_beside_it(slow_server, reference):
    """top_p=1e-300 is 0 in float32: once every token was masked and the whole batch failed."""
    questions, client = [f"question {i} about rivers" for i in range(3)], slow_server.client()

    def stream(question):
        chunks = client.chat.completions.create(model="tiny", messages=ask(question), max_tokens=30, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream, q) for q in questions]
        slow_server.wait_until(lambda h: h["busy"] >= 2)
        odd = client.chat.completions.create(model="tiny", messages=ask("hello"), max_tokens=12, temperature=0.9,
                                             top_p=1e-300)
        for question, answer in zip(questions, streams):
            assert answer.result() == solo(reference, ask(question), 30)[0]
    assert odd.choices[0].message.content == solo(reference, ask("hello"), 12)[0]  # the nucleus: its top token


# ----------------------------------------------------------------------------- hostile connections, stopping

def held_open(port, count, request=b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
    """Sockets that send the start of a request and never finish it."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        socks.append(sock)
    return socks


def closed_by_the_server(sock):
    sock.setblocking(False)
    try:
        return sock.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_held_open_connections_are_closed_after_the_request_timeout_while_others_are_answered(model_dir):
    with running(model_dir, request_timeout=1.5, max_connections=200) as run:
        port = int(run.url.rsplit(":", 1)[1])
        socks = held_open(port, 250)  # past max_connections: the oldest half-sent ones make room
        socks += held_open(port, 3, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                    b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        try:
            with httpx.Client(base_url=run.url, timeout=10) as fresh:  # new connections, as new clients make
                assert fresh.get("/health").json()["status"] == "ok"
                reply = fresh.post("/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 3})
                assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
            deadline = time.time() + 20
            while not all(map(closed_by_the_server, socks)) and time.time() < deadline:
                time.sleep(0.2)
            assert all(map(closed_by_the_server, socks))
            counts = run.server.protocol.counts
            assert counts["replaced"] >= 50 and counts["closed_for_timeout"] >= 150
            assert run.health()["status"] == "ok"
        finally:
            for sock in socks:
                sock.close()


def test_past_max_connections_a_new_connection_is_refused_when_every_one_is_being_answered(model_dir):
    with running(model_dir, load=slowed(0.05), max_connections=2) as run:
        client = run.client()
        streams = [client.chat.completions.create(model="tiny", messages=ask(q), max_tokens=4000, stream=True)
                   for q in ("one", "two")]
        for stream in streams:
            next(iter(stream))
        with pytest.raises(httpx.TransportError):
            httpx.get(run.url + "/health", timeout=5)
        for stream in streams:
            stream.close()
        run.wait_until(lambda h: h["busy"] == 0)
        assert run.server.protocol.counts["refused"] >= 1


def test_prompts_are_rendered_off_the_event_loop(server, monkeypatch):
    """A long conversation takes a while to render and tokenize: meanwhile the server answers others."""
    entered, release, threads = threading.Event(), threading.Event(), []
    render = serve.chat_prompt

    def slow_render(*args):
        threads.append(threading.current_thread().name)
        entered.set()
        assert release.wait(10)
        return render(*args)

    monkeypatch.setattr(serve, "chat_prompt", slow_render)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.http.post, "/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 2})
        assert entered.wait(10)
        assert server.http.get("/health", timeout=5).json()["status"] == "ok"  # the loop is free
        release.set()
        assert pending.result(timeout=10).status_code == 200
    assert threads[0].startswith("grafito-prompt")


def stream_events(url, body):
    """The data of every server-sent event of a streamed request, as sent."""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_a_stop_signal_refuses_new_requests_lets_short_answers_finish_and_ends_the_rest_with_an_error(model_dir):
    with running(model_dir, load=slowed(0.02), drain_seconds=2.5) as run:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(stream_events, run.url, {"messages": ask("talk at length"), "max_tokens": 4000})
            short = pool.submit(stream_events, run.url, {"messages": ask("be brief"), "max_tokens": 6})
            run.wait_until(lambda h: h["busy"] == 2)
            run.server.handle_exit(signal.SIGTERM, None)
            refused = run.http.post("/v1/chat/completions", json={"messages": ask("one more")})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert run.http.get("/health").json() == {"status": "shutting down"}
            long_events, short_events = long.result(timeout=30), short.result(timeout=30)
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length" and short_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error" and long_events[-1] == "[DONE]"
    assert len(long_events) > 8  # it ran on for the drain time


def test_repeated_log_messages_are_written_once_with_a_count():
    import io
    import logging

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(serve.RepeatsCounted(handler, window=0.5))
    log = logging.getLogger("grafito-test-repeats")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(1000):
            log.error("socket.accept() out of system resource")
            log.error("another message")
        time.sleep(0.6)
        log.error("socket.accept() out of system resource")
    finally:
        log.removeHandler(handler)
    assert out.getvalue().splitlines() == ["socket.accept() out of system resource", "another message",
                                           "(the next message was also logged 999 more times, not shown)",
                                           "socket.accept() out of system resource"]


# ----------------------------------------------------------------------------- the command

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_prints_the_page_url_and_serves_with_the_env_api_key(model_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", f"--init_from={model_dir}", f"--port={port}",
                                "--device=cpu", "--dtype=float32", "--log_level=warning"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**__import__("os").environ, "GRAFITO_API_KEY": "from-env"})
    try:
        line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "API key required" in line
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.1)
        models = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(models).status_code == 401
        assert httpx.get(models, headers={"Authorization": "Bearer from-env"}).json()["data"][0]["id"] == "tiny"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def start_command(model_dir, *options):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", f"--init_from={model_dir}", f"--port={port}",
                                "--device=cpu", "--dtype=float32", "--log_level=warning", *options], cwd=ROOT,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"serve.py did not start: {process.communicate()[1][-2000:]}")


def test_sigterm_ends_a_long_stream_with_an_error_event_and_done_then_exits_0(model_dir):
    process, url = start_command(model_dir, "--drain_seconds=0.5")
    try:
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": ask("talk at length"), "max_tokens": 4000, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 3:
                        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert json.loads(events[-2])["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"
    assert "Traceback" not in process.stderr.read()


def test_a_second_server_on_a_busy_port_stops_with_one_error_line_before_serving(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "serve.py", f"--init_from={model_dir}", f"--port={port}",
                                 "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: port {port} on 127.0.0.1 is already in use (another server?): "
                                          f"stop that one or choose another --port"]


def test_a_model_that_cannot_load_stops_the_command_with_one_error_line(tmp_path):
    process = subprocess.run([sys.executable, "serve.py", f"--out_dir={tmp_path / 'no_run'}", f"--port={free_port()}",
                              "--device=cpu", "--log_level=warning"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert process.returncode == 2 and "error: no training run in out_dir" in process.stderr


@pytest.mark.parametrize("option", ["--max_batch=0", "--port=70000", "--temperature=-1", "--log_level=loud"])
def test_bad_options_stop_the_command_before_it_serves(option):
    process = subprocess.run([sys.executable, "serve.py", option], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert process.returncode == 2 and process.stderr.startswith("error:") and "is invalid" in process.stderr



def test_bench_serve_rows_report_throughput_and_time_to_first_token():
    result = subprocess.run([sys.executable, "bench.py", "--rows=serve", "--n_layer=2", "--n_head=2", "--n_embd=64",
                             "--serve_clients=1,2", "--serve_requests=2", "--serve_tokens=3", "--dtype=float32",
                             "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["serve_rows"]
    assert [(r["row"], r["impl"]) for r in rows] == [("serve, 1 clients", "grafito"), ("serve, 2 clients", "grafito")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] and r["ratio_vs_one_client"] > 0
    assert "| serve, 2 clients | grafito |" in result.stdout
