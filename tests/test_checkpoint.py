"""checkpoint.py: where a model comes from (runs, folders, adapters, the hub) and the run folder's rules."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import checkpoint
import lora
from common import GrafitoError, atomic_dir
from model import GPT, GPTConfig


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)).eval()


def adapter_on(base_folder, folder, seed=1):
    """An adapter with non-zero factors saved in folder, trained (so to speak) on base_folder."""
    model = lora.apply_lora(GPT.from_pretrained(base_folder), lora.LoRAConfig(r=2))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.normal_()
    source = checkpoint.resolve(base_folder)
    checkpoint.save_checkpoint(folder.parent, folder.name, model, source.describe(), checkpoint.base_fingerprint(source))
    return model.eval()


# ----------------------------------------------------------------------------- resolve

def test_resolve_tells_runs_folders_adapters_and_hub_names_apart(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "weights")
    adapter_on(tmp_path / "weights", tmp_path / "adapter")
    tiny_gpt().save_pretrained(tmp_path / "run" / checkpoint.LATEST)
    kinds = {name: checkpoint.resolve(tmp_path / name).kind for name in ("weights", "adapter", "run")}
    assert kinds == {"weights": "weights", "adapter": "adapter", "run": "run"}
    assert checkpoint.resolve("gpt2-medium").repo_id == "openai-community/gpt2-medium"
    assert checkpoint.resolve("someone/fine-tune").repo_id == "someone/fine-tune"


def test_a_run_stands_for_its_best_weights_else_its_latest(tmp_path):
    tiny_gpt(seed=1).save_pretrained(tmp_path / "run" / checkpoint.LATEST)
    source = checkpoint.resolve(tmp_path / "run")
    assert checkpoint.weights_folder(source) == tmp_path / "run" / checkpoint.LATEST
    tiny_gpt(seed=2).save_pretrained(tmp_path / "run" / checkpoint.BEST)
    assert checkpoint.weights_folder(source) == tmp_path / "run" / checkpoint.BEST


def test_a_folder_swapped_out_mid_save_is_read_from_its_previous_version(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "run" / checkpoint.BEST)
    (tmp_path / "run" / checkpoint.BEST).rename(tmp_path / "run" / "best.old")  # between atomic_dir's two renames
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(checkpoint.load_model(tmp_path / "run")(idx)[0], tiny_gpt()(idx)[0])
    assert (tmp_path / "run" / "best.old").is_dir()  # readers never rename


def test_unknown_sources_and_folders_without_a_model_are_clear_errors(tmp_path):
    with pytest.raises(GrafitoError, match="no such model folder, and not a GPT-2 name"):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrafitoError, match="no model here"):
        checkpoint.resolve(tmp_path / "empty")


def test_offline_hub_names_fail_with_the_local_folder_alternative():
    # HF_HUB_OFFLINE=1 (conftest): nothing cached, so one error naming the local alternative
    with pytest.raises(GrafitoError, match=r"(?s)unreachable.*init_from=path/to/dir"):
        checkpoint.load_model("gpt2")
    with pytest.raises(GrafitoError, match=r"(?s)unreachable.*No local folder 'someone/fine-tune'"):
        checkpoint.load_model("someone/fine-tune")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers /{owner}/{name}/resolve/{revision}/{file} from a folder, as the hub does."""
    files = {}  # "owner/name" -> folder

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            return
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        folder = self.files.get(repo)
        if folder is None or not (folder / filename).is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if folder is None else "EntryNotFound")
            self.end_headers()
            return
        data = (folder / filename).read_bytes()
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_hub_downloads_go_through_huggingface_hub_and_its_cache(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "served")
    FakeHub.files = {"someone/tiny": tmp_path / "served"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import checkpoint; "
              "m = checkpoint.load_model('someone/tiny'); print(sum(p.sum().item() for p in m.parameters()))")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    try:
        online = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])], env=env,
                                capture_output=True, text=True, timeout=120)
        missing = subprocess.run([sys.executable, "-c", script.replace("someone/tiny", "someone/other"),
                                  str(Path(__file__).parents[1])], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert online.returncode == 0, online.stderr[-2000:]
    assert float(online.stdout) == pytest.approx(sum(p.sum().item() for p in tiny_gpt().parameters()), rel=1e-6)
    assert missing.returncode != 0 and "not found" in missing.stderr
    cached = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])],
                            env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert cached.returncode == 0 and cached.stdout == online.stdout  # offline, from the cache


# ----------------------------------------------------------------------------- adapters

def test_an_adapter_loads_onto_its_base_merged_or_not(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "base")
    trained = adapter_on(tmp_path / "base", tmp_path / "adapter")
    idx = torch.randint(0, 64, (2, 16))
    merged = checkpoint.load_model(tmp_path / "adapter")
    unmerged = checkpoint.load_model(tmp_path / "adapter", merge=False)
    assert not lora.lora_layers(merged) and lora.lora_layers(unmerged)
    assert torch.allclose(merged(idx)[0], trained(idx)[0], atol=1e-5)
    assert torch.allclose(unmerged.eval()(idx)[0], trained(idx)[0], atol=1e-6)


def test_an_adapter_refuses_a_base_that_changed_since(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "base")
    adapter_on(tmp_path / "base", tmp_path / "adapter")
    tiny_gpt(seed=5).save_pretrained(tmp_path / "base")  # retrained
    with pytest.raises(GrafitoError, match="has changed since the adapter was trained"):
        checkpoint.load_model(tmp_path / "adapter")


def test_an_adapter_chain_that_loops_is_an_error(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "base")
    adapter_on(tmp_path / "base", tmp_path / "adapter")
    config = tmp_path / "adapter" / lora.ADAPTER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model": str(tmp_path / "adapter"),
                                  "base_fingerprint": None}))
    with pytest.raises(GrafitoError, match="loops back to itself"):
        checkpoint.load_model(tmp_path / "adapter")


# ----------------------------------------------------------------------------- the run folder

def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    tiny_gpt(seed=1).save_pretrained(tmp_path / "run" / checkpoint.LATEST)
    before = (tmp_path / "run" / checkpoint.LATEST / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "run" / checkpoint.LATEST) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half written")
            raise RuntimeError("killed")
    assert (tmp_path / "run" / checkpoint.LATEST / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [checkpoint.LATEST]


def test_temporary_folders_of_dead_writers_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.tmp-{dead.stdout.strip()}-abc"
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-xyz"  # a process that exists: maybe still writing
    stale.mkdir()
    live.mkdir()
    checkpoint.save_checkpoint(tmp_path, checkpoint.LATEST, tiny_gpt())
    assert not stale.exists() and live.exists()


def test_a_resume_cuts_the_log_back_through_a_temporary_file(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(1, 7)))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed mid-rewrite")))
    with pytest.raises(OSError):
        checkpoint.open_log(tmp_path, step=4)
    assert log.read_text().count("\n") == 6  # nothing lost
    monkeypatch.setattr(os, "replace", real_replace)
    checkpoint.open_log(tmp_path, step=4).close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_an_old_or_foreign_training_state_is_a_clear_error(tmp_path):
    (tmp_path / checkpoint.LATEST).mkdir()
    torch.save({"format": "grafito-train-1"}, tmp_path / checkpoint.LATEST / checkpoint.TRAIN_STATE)
    with pytest.raises(GrafitoError, match="not a training state this grafito resumes"):
        checkpoint.load_train_state(tmp_path)
