"""serve.py under load (bench.py --rows=serve): random weights of the --model shape saved with the
tokenizer files, served by serve.py in its own process, and the same streaming requests sent
through 1, 4, 16... concurrent clients; a peer's OpenAI-compatible server (Peer.server) takes
turns with it on the same weights and requests."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import export
from common import GrafitoError
from model import GPT

ROOT = Path(__file__).resolve().parents[1]


def serve_prompts(count, seed):
    """Distinct chat questions of 15-25 words, the same for every server."""
    words = ("river mountain engine garden letter window planet music number story kitchen market bridge "
             "winter forest signal doctor island yellow silver").split()
    rng = np.random.default_rng(seed)
    return [f"request {i}: " + " ".join(rng.choice(words, rng.integers(15, 26))) for i in range(count)]


def start_server(name, command, port, log):
    """A server process, once its /health answers 200 (or an error with the end of its log)."""
    import httpx

    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise GrafitoError(f"{name} did not start: {log.read()[-2000:]}")


def load_test(url, model, prompts, clients, max_tokens):
    """Stream every prompt through `clients` concurrent clients: (tokens/s over the wall time, times to first token)."""
    import httpx

    async def run():
        todo, results = list(prompts), []
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 2)) as http:
            async def client():
                while todo:
                    prompt, started, first, tokens = todo.pop(0), time.perf_counter(), None, 0
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            raise GrafitoError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]}")
                        async for line in response.aiter_lines():
                            data = line.removeprefix("data:").strip()
                            if not line.startswith("data:") or data == "[DONE]":
                                continue
                            event = json.loads(data)
                            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                                first = first or time.perf_counter()
                            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                    results.append((first - started, tokens))

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return sum(t for _, t in results) / (time.perf_counter() - started), [s for s, _ in results]

    return asyncio.run(run())


def serve_rows(config, gpt_config, device, dtype, peer):
    """Yields a row per server and client count as it is measured; the servers take turns."""
    clients = [int(c) for c in config["serve_clients"].split(",")]
    prompts, tokens = serve_prompts(config["serve_requests"], config["seed"]), config["serve_tokens"]
    work = Path(tempfile.mkdtemp(prefix="grafito-bench-serve-"))
    folder = work / "model"  # weights in transformers' format, the BPE files and the chat template
    port = 18000 + os.getpid() % 1000
    servers = [("grafito", [sys.executable, "serve.py", f"--init_from={folder}", f"--device={device}",
                            f"--dtype={dtype}", f"--port={port}", f"--max_batch={max(clients)}",
                            f"--compile={config['compile']}", "--log_level=warning"], "grafito")]
    theirs = peer.server(folder, device, dtype, port + 1, max(clients), tokens) if peer is not None else None
    if theirs is not None:
        servers.append((peer.name, *theirs))
    processes, logs = [], []
    try:
        torch.manual_seed(0)
        GPT(gpt_config).save_pretrained(folder)
        export.write_tokenizer(folder, gpt_config.block_size)
        for i, (impl, command, model) in enumerate(servers):  # all up at once: idle, none takes the CPU
            logs.append(open(work / f"{impl.replace(' ', '_')}.log", "w+"))
            processes.append(start_server(impl, command, port + i, logs[-1]))
            url = f"http://127.0.0.1:{port + i}"
            load_test(url, model, prompts[:2], 1, 4)  # warm-up: first-request set-up, the batch shapes
            load_test(url, model, prompts[:max(clients)], max(clients), 4)
        for n in clients:  # the servers take turns at each load, so the machine's drift hits all alike
            for i, (impl, _, model) in enumerate(servers):
                tokens_per_s, firsts = load_test(f"http://127.0.0.1:{port + i}", model, prompts, n, tokens)
                yield {"row": f"serve, {n} clients", "impl": impl,
                       "batch": f"{len(prompts)} requests x {tokens} new tokens", "tokens_per_s": tokens_per_s,
                       "ttft_p50_s": float(np.percentile(firsts, 50)), "ttft_p95_s": float(np.percentile(firsts, 95))}
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
        shutil.rmtree(work, ignore_errors=True)


def with_serve_ratios(rows):
    """Each row's throughput over the same server's at the fewest clients, and grafito's over the peer's."""
    fewest = min(int(r["row"].split()[1]) for r in rows) if rows else 0
    for r in rows:
        alone = next(o for o in rows if o["impl"] == r["impl"] and o["row"] == f"serve, {fewest} clients")
        r["ratio_vs_one_client"] = r["tokens_per_s"] / alone["tokens_per_s"]
        if r["impl"] == "grafito":
            for other in rows:
                if other["row"] == r["row"] and other["impl"] != "grafito":
                    r[f"ratio_vs_{other['impl']}"] = r["tokens_per_s"] / other["tokens_per_s"]
    return rows


def print_serve_table(rows):
    print("| row | impl | requests | tokens/s | vs 1 client | TTFT p50 s | TTFT p95 s | ours/peer |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = ", ".join(f"{v:.2f}x" for k, v in r.items() if k.startswith("ratio_vs_") and k != "ratio_vs_one_client")
        print(f"| {r['row']} | {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {r['ratio_vs_one_client']:.2f}x "
              f"| {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {ratio} |")
