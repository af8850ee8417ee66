"""Test set-up: repository root on sys.path, offline hub, tokenizer cache from ../shared; fixtures:
tiny datasets and models, an emulated GPU, and a local stand-in for the hub (fake_hub)."""

import hashlib
import http.server
import json
import os
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network; the offline errors are tested
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")

GRAFITO_25K = SHARED / "data" / "grafito-25k"
HH_RLHF_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
needs_shared = pytest.mark.skipif(not GRAFITO_25K.exists(), reason="../shared data not present")


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: a random tiny transformers GPT-2 saved with save_pretrained; returns (folder, model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    def make(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97, seed=0, name="hf", **settings):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                            vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **settings)
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():  # random biases and LayerNorm affines too, so every tensor is checked
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return folder, model

    return make


def prepare_head(folder, n_train, n_val):
    """The first real grafito-25k conversations, prepared in the standard format."""
    sys.path.insert(0, str(ROOT / "prepare"))
    import data
    import grafito25k
    import pipeline
    import tokenizer

    if not GRAFITO_25K.exists():
        pytest.skip("../shared data not present")
    text = "\n\n\n".join(GRAFITO_25K.read_text(encoding="utf-8").split("\n\n\n")[:n_train + n_val + 10])
    report = pipeline.Report("grafito-25k head")
    kept = pipeline.clean_records(grafito25k.parse(text, report), report, detokenize=True)
    rendered = tokenizer.render_batch([r.turns for r in kept])
    data.write_dataset(folder, {"train": rendered[:n_train], "val": rendered[n_train:n_train + n_val]},
                       {"dataset": folder.name, "vocab_size": 50257})
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """100 train and 20 val conversations of grafito-25k."""
    return prepare_head(tmp_path_factory.mktemp("data") / "tiny", 100, 20)


def random_gpt_folder(folder, **shape):
    """A GPT-2-format folder holding a seeded random GPT of this shape with the real vocabulary."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, **shape)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny GPT-2-format folder (width 32, context 96) with the real vocabulary, for generation tests."""
    return random_gpt_folder(tmp_path_factory.mktemp("model") / "tiny", n_embd=32, block_size=96)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A small GPT-2-format weights folder with the real vocabulary (a stand-in for gpt2)."""
    return random_gpt_folder(tmp_path_factory.mktemp("model") / "base", n_embd=64, block_size=128)


TAUGHT = [  # what the tiny model learns by heart, so that its greedy answers are clear-cut
    [("what is the capital of france", "Paris is the capital of France.")],
    [("hi", "Hello! How can I help?"), ("what is 2+2", "4, because 2 + 2 = 4.")],
]


@pytest.fixture(scope="session")
def taught_model():
    """A tiny GPT (GPT-2's real vocabulary) trained on TAUGHT until it knows the answers by heart:
    its greedy answers differ by prompt and end with end-of-text, where a random model's repeat
    one token until max_new_tokens."""
    import torch

    import tokenizer
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    rows = [tokenizer.render(c) for c in TAUGHT]
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), tokenizer.EOT)
    y = torch.full((len(rows), width), -1)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    flushed = torch.set_flush_denormal(True)  # the unused vocabulary's vanishing gradients: slow denormals
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second core, and wait long when it is busy
    try:
        for _ in range(100):
            loss = model(x, y)[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    return model.eval()


@pytest.fixture
def emulated_gpu(monkeypatch):
    """Factory: make this CPU build of torch report one CUDA GPU (capability, name, memory).

    Only what the CPU build lacks is replaced: CUDA's lazy init, the device count, the
    properties query and the current-device getter and setter. torch's own functions
    (set_device, get_device_capability, get_device_name, current_device) and their argument
    checks run as they would on a GPU. Returns the list of device indices set_device selected.
    The first tensor moved to the GPU still fails: 'Torch not compiled with CUDA enabled'."""
    import types

    import torch

    def emulate(capability=(9, 0), name="NVIDIA H100 80GB HBM3", memory=80 * 2 ** 30):
        selected = []

        def properties(index):
            return types.SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=memory)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
        monkeypatch.setattr(torch.cuda, "_get_device_properties", properties, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)
        return selected

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield emulate
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # setup() turned TF32 on


# ----------------------------------------------------------------------------- a hub dataset, through a local stand-in

COMMIT = "c0ffee" + "0" * 34


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's dataset API as huggingface_hub calls it: the file list of the default branch or
    a revision (/api/datasets/{repo}[/revision/{rev}]) and the files (/datasets/{repo}/resolve/{rev}/{path})."""
    repos = {}  # "owner/name" -> folder
    requests = []

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        path = urllib.parse.unquote(self.path.split("?")[0])
        self.requests.append(path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"] and (len(parts) == 4 or len(parts) == 6 and parts[4] == "revision"):
            folder = self.repos.get("/".join(parts[2:4]))
            if folder is None:
                return self.missing("RepoNotFound")
            if len(parts) == 6 and parts[5] not in ("main", "v1", COMMIT):
                return self.missing("RevisionNotFound")
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            siblings = [{"rfilename": str(p.relative_to(folder)), "size": p.stat().st_size} for p in files]
            return self.send(json.dumps({"id": "/".join(parts[2:4]), "sha": COMMIT, "siblings": siblings}).encode(), body)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            folder = self.repos.get("/".join(parts[1:3]))
            if folder is None:
                return self.missing("RepoNotFound")
            file = folder / "/".join(parts[5:])
            if not file.is_file():
                return self.missing("EntryNotFound")
            return self.send(file.read_bytes(), body)
        self.missing("RepoNotFound")

    def send(self, payload, body):
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(payload).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def missing(self, code):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tmp_path):
    """A local hub serving FakeHub.repos; yields the environment of a subprocess that downloads from it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.requests = []
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    yield env
    server.shutdown()
    server.server_close()
