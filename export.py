"""Ship a trained model: a Hugging Face folder (weights, tokenizer, chat template, generation
settings, model card), a GGUF file for llama.cpp, ollama and LM Studio, a LoRA run's adapter
in peft's format, and publishing to the Hugging Face hub.

    python export.py --out_dir=out/ruby_002                          # -> out/ruby_002/export
    python export.py --out_dir=out/ruby_002 --to=hf,gguf --outtype=q8_0
    python export.py --out_dir=out/lazuli_001 --to=peft              # the adapter alone
    python export.py --init_from=gpt2 --to=gguf --dest=export/gpt2   # any model grafito loads
    python export.py --out_dir=out/ruby_002 --to=hf,gguf --push=user/ruby-002

A run is exported from its best/ weights (else ckpt/), a LoRA adapter merged into its base.
The folder (--dest) holds README.md (a model card written from the run) and, per format:
  hf    config.json, model.safetensors, generation_config.json, vocab.json, merges.txt,
        tokenizer_config.json, special_tokens_map.json, chat_template.jinja
  gguf  <name>-<outtype>.gguf and an ollama Modelfile
  peft  adapter_config.json + adapter_model.safetensors (in peft/ when hf is exported too,
        so that transformers does not apply the adapter to the already merged weights)
"""

import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import data
import engine
import lora
import tokenizer
from common import GrafitoError, atomic_dir, run_cli
from configurator import load_config
from model import TANH_GELUS, hf_config

DEFAULTS = dict(
    out_dir="out/ruby_002",  # the training run to export
    init_from="resume",  # resume (the run in out_dir) | gpt2, gpt2-medium, ... | hub repo id | model folder | a run
    to="hf",  # comma-separated: hf (Hugging Face folder), gguf (llama.cpp / ollama), peft (a LoRA run's adapter)
    outtype="auto",  # auto (hf f32, gguf f16) | f32 | f16 | bf16 | q8_0 (gguf only)
    dest="",  # the folder to write; default <out_dir>/export, or export/<name> for --init_from
    overwrite=False,  # replace an existing dest folder
    name="",  # the model's name (card title, general.name, file names); default from the run's folder
    gguf_output=False,  # also write GGUF's output.weight (a copy of the tied token embedding) for older runtimes
    license="mit",  # the card's licence (GPT-2's weights are MIT)
    eval="",  # eval.py's JSON for the card's zero-shot table; default <out_dir>/eval/zero_shot.json, eval/zero_shot.json
    push="",  # user/name: create this hub repo if needed and upload the folder
    private=False,  # with --push: create the repo private
)
FORMATS = ("hf", "gguf", "peft")
EXPORT_MARK = ".grafito-export"  # in every folder export.py writes: --overwrite replaces only folders holding it
OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
HUB_DATASETS = {"hh_rlhf": "Anthropic/hh-rlhf", "dolly": "databricks/databricks-dolly-15k"}


# ----------------------------------------------------------------------------- model and run

@dataclass
class Exported:
    """What is exported: `spec` as given, the weights folder it resolved to, and the run around it."""
    spec: str
    folder: Path | None  # the weights folder (a run's best/ or ckpt/), None for hub names
    run_dir: Path | None  # the training run (train_config.json), if any
    adapter: dict | None  # the LoRA adapter's config when the weights are an adapter


def load_for_export(spec, merged=True, unmerged=False):
    """(merged GPT or None, GPT with its LoRA adapters unmerged or None, Exported)."""
    source = checkpoint.resolve(spec)
    folder = None if source.kind == "hub" else checkpoint.weights_folder(source)
    adapter = lora.read_adapter_config(folder) if folder is not None and (folder / lora.ADAPTER_CONFIG).is_file() else None
    candidates = [source.path] if source.kind == "run" else [folder.parent] if folder is not None else []
    run_dir = next((d for d in candidates if (d / "train_config.json").is_file()), None)
    exported = Exported(spec=str(spec), folder=folder, run_dir=run_dir, adapter=adapter)
    if unmerged and adapter is None:
        raise GrafitoError(f"--to=peft exports a LoRA adapter, but {folder or spec} holds full weights (not a LoRA "
                           f"run); export it with --to=hf or --to=gguf")
    model = checkpoint.load_model(source).eval() if merged else None
    lora_model = checkpoint.load_model(source, merge=False).eval() if unmerged else None
    return model, lora_model, exported


def lora_adapters(lora_model):
    """{module path inside a block: [LoRALinear per layer]} of a model with unmerged adapters."""
    layers = {}
    for block in lora_model.transformer.h:
        for path in sorted({path for path, _ in lora.TARGETS.values()}):
            parent, child = path.split(".")
            layer = getattr(getattr(block, parent), child)
            if isinstance(layer, lora.LoRALinear):
                layers.setdefault(path, []).append(layer)
    return layers


@dataclass
class RunInfo:
    """What the model card and GGUF metadata say about the run; empty for a plain model."""
    train_config: dict = field(default_factory=dict)
    steps: int | None = None  # the last logged step
    best_val: tuple | None = None  # (loss, step, DPO reward accuracy or None) of the lowest val loss: best/
    last_val: tuple | None = None  # the same for the last evaluation
    zero_shot: dict | None = None  # {"queries", "labels", "answers": {label: [...]}, "this": label, "val", "accuracy"}
    dataset: dict = field(default_factory=dict)  # {"hub", "url", "conversations"} from the prepared data's meta.json


def read_run_info(source, eval_path=""):
    """train_config.json, log.jsonl and eval.py's JSON of the run `source` belongs to."""
    info = RunInfo()
    run = source.run_dir
    if run is not None:
        info.train_config = _read_json(run / "train_config.json")
        log = run / "log.jsonl"
        rows = []
        if log.is_file():
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
        rows = [r for r in rows if isinstance(r, dict) and "step" in r]
        vals = [(r["val_loss"], r["step"], r.get("val_reward_accuracy")) for r in rows  # DPO runs log accuracy too
                if isinstance(r.get("val_loss"), (int, float))]
        info.steps = max((r["step"] for r in rows), default=None)
        info.best_val = min(vals, default=None, key=lambda v: v[0])
        info.last_val = vals[-1] if vals else None
        info.dataset = _dataset_facts(info.train_config.get("dataset"))
    candidates = [Path(eval_path)] if eval_path else (
        ([run / "eval" / "zero_shot.json"] if run is not None else []) + [Path("eval") / "zero_shot.json"])
    for path in candidates:
        if eval_path and not path.is_file():
            raise GrafitoError(f"--eval={eval_path}: no such file (eval.py writes it beside its table, e.g. "
                               f"eval/zero_shot.json)")
        if path.is_file():
            info.zero_shot = _zero_shot(_read_json(path), source)
            if info.zero_shot is None and eval_path:
                raise GrafitoError(f"--eval={eval_path}: holds no results for {source.spec}")
            if info.zero_shot is not None:
                break
    return info


def _dataset_facts(dataset):
    """Where the run's dataset came from, when its prepared folder is on this machine."""
    try:
        meta = data.load_meta(dataset) if dataset else None
    except GrafitoError:
        meta = None
    if not meta:
        return {"hub": HUB_DATASETS.get(dataset)} if dataset else {}
    source = meta.get("source") or {}
    rows = (meta.get("splits") or {}).get("train", {}).get("conversations")
    if meta.get("kind") == "pairs":  # a pair is two rows: a chosen and a rejected answer
        return {"hub": source.get("hub_dataset"), "url": source.get("url"), "pairs": rows // 2 if rows else None}
    return {"hub": source.get("hub_dataset"), "url": source.get("url"), "conversations": rows}


def _zero_shot(report, source):
    """The zero-shot table of an eval.py report that evaluated this source, else None."""
    results = report.get("results") or []
    mine = {str(Path(p).resolve()) for p in (source.spec, source.folder, source.run_dir) if p is not None}
    this = next((r for r in results if str(Path(str(r.get("source", ""))).resolve()) in mine), None)
    if this is None or not report.get("queries"):
        return None
    return {"queries": report["queries"], "labels": [r["label"] for r in results], "this": this["label"],
            "answers": {r["label"]: r.get("answers", []) for r in results},
            "val": this.get("val", {}), "accuracy": this.get("short_answer_accuracy")}


def _val(evaluation, dpo):
    """A logged evaluation for the card: the loss, then perplexity (SFT) or reward accuracy (DPO)."""
    loss, step, accuracy = evaluation
    if dpo:
        return f"{loss:.4f}" + (f" (reward accuracy {accuracy:.1%})" if accuracy is not None else "") + f" at step {step}"
    return f"{loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f}) at step {step}"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise GrafitoError(f"cannot read {path}: {err}") from None


def sampling_defaults():
    """The generation settings the exported model ships with: those sample.py and serve.py use."""
    return dict(engine.CHAT_DEFAULTS)


# ----------------------------------------------------------------------------- the GPT-2 BPE, byte-level

def byte_to_char():
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@functools.cache
def bpe_vocab():
    """(tokens, merges) of grafito's BPE as byte-level strings: tokens[i] is id i's string
    (<|endoftext|> last), merges the 50,000 pairs in rank order. Rebuilt from tiktoken's
    ranks: each token's pair is what BPE with only the lower ranks leaves of its bytes."""
    enc = tokenizer.get_encoding()
    token_bytes = [enc.decode_single_token_bytes(i) for i in range(tokenizer.EOT)]
    rank = {b: i for i, b in enumerate(token_bytes)}
    chars = byte_to_char()
    as_text = lambda b: "".join(chars[x] for x in b)
    merges = []
    for i, whole in enumerate(token_bytes):
        if len(whole) == 1:
            continue
        parts = [whole[k:k + 1] for k in range(len(whole))]
        while len(parts) > 2:
            pairs = [(rank.get(parts[k] + parts[k + 1], math.inf), k) for k in range(len(parts) - 1)]
            _, k = min(p for p in pairs if p[0] < i)
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        merges.append(f"{as_text(parts[0])} {as_text(parts[1])}")
    return [as_text(b) for b in token_bytes] + [tokenizer.EOT_TEXT], merges


def write_tokenizer(folder, block_size):
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    tokens, merges = bpe_vocab()
    folder.joinpath("vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                             encoding="utf-8")
    folder.joinpath("merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eot = tokenizer.EOT_TEXT
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": eot,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        # decoding must give back tiktoken's text: no space clean-up, invalid UTF-8 replaced
        "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": block_size,
        "added_tokens_decoder": {str(tokenizer.EOT): {"content": eot, "lstrip": False, "normalized": True,
                                                      "rstrip": False, "single_word": False, "special": True}},
        "chat_template": tokenizer.CHAT_TEMPLATE,
    }
    folder.joinpath("tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
    folder.joinpath("special_tokens_map.json").write_text(json.dumps(
        {"bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": eot}, indent=2) + "\n")
    folder.joinpath("chat_template.jinja").write_text(tokenizer.CHAT_TEMPLATE, encoding="utf-8")


# ----------------------------------------------------------------------------- Hugging Face folder

def write_hf(model, folder, outtype):
    """config.json, model.safetensors and generation_config.json in transformers' GPT-2 format."""
    from safetensors.torch import save_file

    dtype = HF_DTYPES[outtype]
    config = hf_config(model.config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    folder.joinpath("config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.to(dtype).contiguous()
             for name, tensor in tqdm(model.hf_state_dict().items(), desc="model.safetensors", unit="tensor",
                                      leave=False)}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    sampling = sampling_defaults()
    generation = {"bos_token_id": tokenizer.EOT, "eos_token_id": tokenizer.EOT, "pad_token_id": tokenizer.EOT,
                  "do_sample": sampling["temperature"] > 0, "temperature": sampling["temperature"],
                  "top_k": sampling["top_k"], "top_p": sampling["top_p"],
                  "repetition_penalty": sampling["repetition_penalty"], "max_new_tokens": sampling["max_new_tokens"]}
    folder.joinpath("generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ----------------------------------------------------------------------------- peft adapter

def write_peft(lora_model, folder, source):
    """adapter_config.json + adapter_model.safetensors for peft's LoRA on transformers' GPT2LMHeadModel.

    peft has one adapter per module; grafito has one per chosen third of the fused c_attn
    (q, k, v). k of them become one adapter of rank k*r: A stacked (k*r, in), and B with
    each adapter's (out/3, r) block in its third's rows and its own r columns, zeros
    elsewhere, so B @ A is exactly grafito's update. peft scales by lora_alpha / rank, so
    that module's alpha is k * alpha: the same alpha / r as grafito."""
    from safetensors.torch import save_file

    meta = source.adapter
    state, ranks, alphas = {}, {}, {}
    for path, layers in lora_adapters(lora_model).items():
        for i, layer in enumerate(layers):
            k, r = layer.lora_A.shape[:2]
            third = layer.out_features // layer.chunks
            B = torch.zeros(layer.out_features, k * r)
            for j, chunk in enumerate(layer.adapted.tolist()):
                B[chunk * third:(chunk + 1) * third, j * r:(j + 1) * r] = layer.lora_B[j].float()
            key = f"base_model.model.transformer.h.{i}.{path}"
            state[f"{key}.lora_A.weight"] = layer.lora_A.detach().float().reshape(k * r, -1).contiguous()
            state[f"{key}.lora_B.weight"] = B.contiguous()
            ranks[path], alphas[path] = k * r, k * meta["alpha"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": hub_id(meta["base_model"]) or
        meta["base_model"], "r": meta["r"], "lora_alpha": meta["alpha"], "lora_dropout": meta["dropout"],
        "target_modules": sorted(ranks), "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights (in, out)
        "bias": "none", "inference_mode": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {p: n for p, n in ranks.items() if n != meta["r"]},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != meta["alpha"]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    folder.joinpath("adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})


# ----------------------------------------------------------------------------- GGUF and ollama

GGUF_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)


def gguf_tensor(gguf, array, gguf_name, outtype):
    """(data, raw GGML type) of one tensor in outtype; norms, biases and position embeddings stay
    float32, and a matrix whose rows do not split into Q8_0's 32-value blocks falls back to f16."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or gguf_name.startswith("position_embd") or outtype == "f32":
        return array, Q.F32
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(array, Q.BF16), Q.BF16
    return array.astype("float16"), Q.F16


def write_gguf(model, path, outtype, name, info, write_output=False):
    """One GGUF file of llama.cpp's gpt2 architecture: hyperparameters, tokenizer, chat template,
    tensors named by gguf's own map of GPT-2's Hugging Face names."""
    import gguf

    config = model.config
    activation = config.activation
    if activation not in TANH_GELUS:  # the GELU llama.cpp's gpt2 graph computes
        raise GrafitoError(f"--to=gguf: this model's MLP uses activation {activation!r}, but llama.cpp's gpt2 "
                           f"architecture computes the tanh GELU (gelu_new); export it with --to=hf instead")
    if config.vocab_size < tokenizer.VOCAB_SIZE:
        raise GrafitoError(f"--to=gguf: the model has {config.vocab_size} embedding rows, fewer than the "
                           f"{tokenizer.VOCAB_SIZE} tokens of GPT-2's BPE it is exported with")
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    state = model.hf_state_dict()
    n_params = sum(t.numel() for t in state.values())
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_license(info.get("license", "mit"))
    writer.add_tags(["grafito", "gpt2", "chat"])
    base = info.get("base_model")
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType[GGUF_FILE_TYPES[outtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    sampling = sampling_defaults()
    writer.add_sampling_temp(sampling["temperature"])
    writer.add_sampling_top_k(sampling["top_k"])
    writer.add_sampling_top_p(sampling["top_p"])
    writer.add_sampling_penalty_repeat(sampling["repetition_penalty"])

    tokens, merges = bpe_vocab()
    types = [gguf.TokenType.NORMAL] * tokenizer.EOT + [gguf.TokenType.CONTROL]
    padding = range(len(tokens), config.vocab_size)  # rows beyond the tokenizer (e.g. a fine-tune that added some)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
    writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.EOT)
    writer.add_eos_token_id(tokenizer.EOT)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    if write_output:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    fallback = []
    for hf_name, tensor in tqdm(state.items(), desc=f"GGUF {outtype}", unit="tensor", leave=False):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GrafitoError(f"--to=gguf: no GGUF name for tensor {hf_name!r}")
        if tensor.ndim == 2 and hf_name.endswith(CONV1D):  # llama.cpp wants (out, in), as nn.Linear holds it
            tensor = tensor.t()
        data, qtype = gguf_tensor(gguf, tensor.float().contiguous().numpy(), gguf_name, outtype)
        if outtype == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
            fallback.append(gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    if fallback:
        print(f"(q8_0 needs rows of a multiple of 32 values: {len(fallback)} tensors written as f16, "
              f"e.g. {fallback[0]})", file=sys.stderr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


# grafito's template in ollama's Go template language: a first system message is folded into
# the first instruction, as turns_from_messages does (Go templates have no replace, so text is
# not neutralized: a user can forge a turn here, unlike in grafito and the Jinja template)
OLLAMA_TEMPLATE = (
    '{{- $system := "" }}{{ $first := true }}\n'
    '{{- range .Messages }}\n'
    '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
    '{{- else if eq .Role "user" }}{{ if not $first }}{{ "\\n\\n" }}{{ end }}'
    f'{tokenizer.INSTRUCTION} '
    '{{ if $system }}{{ $system }}{{ "\\n\\n" }}{{ $system = "" }}{{ end }}{{ .Content }}{{ "\\n\\n" }}'
    f'{tokenizer.ANSWER}'
    '{{ $first = false }}\n'
    '{{- else if eq .Role "assistant" }} {{ .Content }}\n'
    '{{- end }}\n'
    '{{- end }}'
)


def write_modelfile(folder, gguf_name, name, block_size):
    sampling = sampling_defaults()
    lines = [
        f"# ollama create {name} -f Modelfile && ollama run {name}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        f'PARAMETER stop "{tokenizer.EOT_TEXT}"',
        f'PARAMETER stop "{tokenizer.INSTRUCTION}"',
        f"PARAMETER num_ctx {block_size}",
        f"PARAMETER num_predict {sampling['max_new_tokens']}",
        f"PARAMETER temperature {sampling['temperature']}",
        f"PARAMETER top_k {sampling['top_k']}",
        f"PARAMETER top_p {sampling['top_p']}",
        f"PARAMETER repeat_penalty {sampling['repetition_penalty']}",
    ]
    folder.joinpath("Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- model card

def hub_id(name):
    """The hub repo id a base model name stands for, or None for a local folder."""
    name = str(name)
    if name in checkpoint.HUB_REPOS:
        return checkpoint.HUB_REPOS[name]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists() and not name.startswith("."):
        return name
    return None


def describe(model, source, info, name, where):
    """The facts the card and the GGUF metadata share."""
    c = info.train_config
    base = source.adapter["base_model"] if source.adapter else c.get("init_from") if c else source.spec
    if base in ("resume", "scratch"):  # a resumed run's train_config no longer names its base
        base = None if base == "resume" else "scratch"
    lora = source.adapter or ({"r": c["lora_r"], "alpha": c.get("lora_alpha"), "targets": c.get("lora_targets")}
                              if c.get("lora_r") else None)
    padding = (model.config.padded_vocab_size - model.config.vocab_size) * model.config.n_embd
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - padding
    return {"name": name, "base": base, "base_model": hub_id(base) if base else None, "dataset": c.get("dataset"),
            "best_is_exported": source.folder is not None and source.folder.name == "best",
            "dataset_hub": info.dataset.get("hub"), "dataset_url": info.dataset.get("url"),
            "conversations": info.dataset.get("conversations"), "pairs": info.dataset.get("pairs"), "lora": lora,
            "params": n_params, "where": where}


def model_card(model, info, facts, formats, files, license):
    c, cfg = info.train_config, model.config
    dpo = c.get("objective") == "dpo"
    targets = facts["lora"] and facts["lora"].get("targets")
    targets = ", ".join(targets) if isinstance(targets, (list, tuple)) else targets
    tags = ["grafito", "gpt2", "chat", "text-generation"] + (["lora", "peft"] if facts["lora"] else []) + (
        ["gguf"] if "gguf" in formats else [])
    front = {"license": license, "language": ["en"], "pipeline_tag": "text-generation",
             "library_name": "peft" if formats == ["peft"] else "transformers", "tags": tags}
    if facts["base_model"]:
        front["base_model"] = facts["base_model"]
    if facts["dataset_hub"]:
        front["datasets"] = [facts["dataset_hub"]]
    lines = ["---"] + [f"{key}: {json.dumps(value)}" for key, value in front.items()] + ["---", ""]
    size = f"{facts['params'] / 1e6:.0f}M"
    how = (f"LoRA (r={facts['lora']['r']}, alpha={facts['lora']['alpha']}, on {targets})" if facts["lora"]
           else "full fine-tuning" if c else "no fine-tuning by grafito")
    lines += [f"# {facts['name']}", "",
              f"A {size}-parameter GPT-2 chat model ({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
              f"{cfg.block_size}-token context) made with grafito: "
              + ("trained from scratch" if facts["base"] == "scratch" else f"base `{facts['base']}`" if facts["base"]
                 else "base not recorded (a resumed run)")
              + (f", dataset `{facts['dataset']}`" if facts["dataset"] else "")
              + (f" ({facts['conversations']:,} training conversations)" if facts["conversations"] else "")
              + (f" ({facts['pairs']:,} training preference pairs)" if facts.get("pairs") else "")
              + f", {how}" + (", preference-tuned with DPO" if dpo else "") + "." + (f" Dataset source: {facts['dataset_url'] or facts['dataset_hub']}."
                               if facts["dataset_url"] or facts["dataset_hub"] else ""), ""]
    if c:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        for key in ("init_from", "dataset", "objective", "beta", "label_smoothing", "dpo_reference", "block_size",
                    "batch_size", "gradient_accumulation_steps",
                    "tokens_per_step", "max_iters", "epochs", "learning_rate", "min_lr", "lr_schedule",
                    "warmup_iters", "weight_decay", "dropout", "grad_clip", "lora_r", "lora_alpha", "lora_dropout",
                    "lora_targets", "dtype", "seed"):
            if key in c and not (key.startswith("lora_") and not c.get("lora_r")) and not (
                    key in ("beta", "label_smoothing", "dpo_reference") and not dpo):
                lines.append(f"| {key} | {c[key]} |")
        if info.steps is not None:
            lines.append(f"| steps trained | {info.steps} |")
        if info.best_val:
            these = " (these weights)" if facts["best_is_exported"] else ""
            lines.append(f"| best val {'DPO ' if dpo else ''}loss{these} | {_val(info.best_val, dpo)} |")
        if info.last_val:
            lines.append(f"| final val {'DPO ' if dpo else ''}loss | {_val(info.last_val, dpo)} |")
        lines.append("")
    lines += ["## Prompt format", "",
              "Each turn is an instruction and an answer; the model answers after `### Answer:` and ends its "
              "answer with `<|endoftext|>`:", "", "```",
              f"{tokenizer.INSTRUCTION} {{instruction}}{tokenizer.TURN_SEPARATOR}{tokenizer.ANSWER} {{answer}}"
              f"{tokenizer.TURN_SEPARATOR}{tokenizer.INSTRUCTION} {{next instruction}}"
              f"{tokenizer.TURN_SEPARATOR}{tokenizer.ANSWER}", "```", "",
              "A system message is folded into the first instruction (`{system}\\n\\n{instruction}`). "
              "The chat template (`chat_template.jinja`, also in `tokenizer_config.json` and the GGUF) renders "
              "exactly this; stop generating at `<|endoftext|>` or `### Instruction:`.", ""]
    lines += ["## Use", ""] + usage(files, facts)
    if info.zero_shot:
        z = info.zero_shot
        lines += ["## Zero-shot answers", "",
                  f"From grafito's eval.py (greedy; this model is `{z['this']}`):", "",
                  "| query | " + " | ".join(z["labels"]) + " |", "|---" * (len(z["labels"]) + 1) + "|"]
        for i, query in enumerate(z["queries"]):
            cells = [_cell(z["answers"][label][i] if i < len(z["answers"][label]) else "") for label in z["labels"]]
            lines.append(f"| {_cell(query)} | " + " | ".join(cells) + " |")
        for dataset, v in z["val"].items():
            lines.append(f"\nval loss on {dataset}: {v['loss']:.4f} (perplexity {v['perplexity']:.2f})")
        if z["accuracy"]:
            a = z["accuracy"]
            lines.append(f"\nshort-answer accuracy: {a['accuracy']:.1%} ({a['correct']}/{a['samples']})")
        lines.append("")
    lines += ["## Limitations", "",
              f"A small ({size}) model fine-tuned on short instruction/answer pairs: it states wrong facts with "
              "confidence, cannot do arithmetic or reasoning reliably, forgets long conversations (a "
              f"{cfg.block_size}-token context), answers mostly in English, and inherits the biases of GPT-2's web "
              "text and of its dataset. It has no safety tuning. Use it for experiments and small tasks, not for "
              "advice or facts that matter.", ""]
    return "\n".join(lines)


def _cell(text):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 60 else text[:58] + ".."


def usage(files, facts):
    out = []
    if "config.json" in files:
        out += ["```python", "from transformers import pipeline",
                f'chat = pipeline("text-generation", model="{facts["where"]}")',
                'print(chat([{"role": "user", "content": "what is 2+2"}], max_new_tokens=64)[0]["generated_text"][-1])',
                "```", ""]
    gguf_files = [f for f in files if f.endswith(".gguf")]
    if gguf_files:
        out += ["```bash", f"llama-cli -m {gguf_files[0]} --jinja -cnv   # the chat template is in the file",
                f"ollama create {facts['name']} -f Modelfile && ollama run {facts['name']}", "```", ""]
    if any(f.endswith("adapter_config.json") for f in files):
        where = facts["where"] + ('", subfolder="peft' if "config.json" in files else "")
        out += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                f'base = AutoModelForCausalLM.from_pretrained("{facts["base_model"] or facts["base"] or "BASE"}")',
                f'model = PeftModel.from_pretrained(base, "{where}")', "```", ""]
    return out


# ----------------------------------------------------------------------------- publishing

def check_push(repo_id):
    """Everything --push needs, before any work: a repo id, the hub online, a token it accepts."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise GrafitoError(f"--push={repo_id}: give a hub repo id, user/name")
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise GrafitoError("--push: the Hugging Face hub is off (HF_HUB_OFFLINE=1); unset it to publish, or export "
                           "without --push and upload the folder later (hf upload user/name DEST)")
    token = get_token()
    if not token:
        raise GrafitoError("--push needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami(token=token)
    except Exception as err:
        raise GrafitoError(f"--push: cannot use the hub ({type(err).__name__}: {err}); check the network and "
                           f"your token (hf auth whoami)") from None
    return token


def push(folder, repo_id, token, private):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload grafito export",
                          ignore_patterns=[EXPORT_MARK])
    except Exception as err:
        raise GrafitoError(f"--push={repo_id}: upload failed ({type(err).__name__}: {err}); the folder is "
                           f"complete at {folder}: retry with hf upload {repo_id} {folder}") from None
    print(f"pushed {folder} to {url}")


# ----------------------------------------------------------------------------- the command

def parse_options(config):
    """(formats, hf outtype, gguf outtype, source spec, name, dest) from the options, or one error."""
    formats = [f.strip() for f in config["to"].split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise GrafitoError(f"--to={config['to']}: choose one or more of {', '.join(FORMATS)}, comma-separated")
    formats = list(dict.fromkeys(formats))
    outtype = config["outtype"]
    if outtype not in OUTTYPES:
        raise GrafitoError(f"--outtype={outtype}: choose one of {', '.join(OUTTYPES)}")
    if outtype == "q8_0" and "hf" in formats:
        raise GrafitoError("--outtype=q8_0 is for GGUF only; use --to=gguf, or f32, f16 or bf16 for the "
                           "Hugging Face folder")
    hf_type = "f32" if outtype == "auto" else outtype
    gguf_type = "f16" if outtype == "auto" else outtype
    if config["init_from"] == "scratch":
        raise GrafitoError("--init_from=scratch: there is no model to export; name a trained one")
    spec = checkpoint.model_source(config["init_from"], config["out_dir"]).name
    folder = Path(spec.rstrip("/"))
    if folder.name in (checkpoint.BEST, checkpoint.LATEST, checkpoint.MERGED) and (folder.parent / "train_config.json").is_file():
        folder = folder.parent  # a run's weights folder: named after the run
    name = config["name"] or folder.name.replace("_", "-")
    if not re.fullmatch(r"[\w.-]+", name):
        raise GrafitoError(f"--name={name!r}: use letters, digits, '.', '_' and '-' (it names files)")
    dest = Path(config["dest"]) if config["dest"] else (
        Path(spec) / "export" if config["init_from"] == "resume" else Path("export") / name)
    if dest.exists() and not dest.is_dir():
        raise GrafitoError(f"--dest={dest} is a file; give a folder to write the export into")
    target = dest.resolve()
    if target == Path.cwd() or target in Path.cwd().parents:
        raise GrafitoError(f"--dest={dest} is this folder or one above it; the export replaces dest as a whole, "
                           f"so give a folder of its own, e.g. export/{name}")
    if Path(spec).exists():  # the export replaces dest as a whole: never the model's own folders
        source = Path(spec).resolve()
        weights = [source / sub for sub in (checkpoint.BEST, checkpoint.LATEST, checkpoint.MERGED)]
        if (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
            weights.append(source)
        if target == source or target in source.parents or any(w == target or w in target.parents for w in weights):
            raise GrafitoError(f"--dest={dest} would replace or write into the weights being exported; "
                               f"choose a folder outside them (the default is <out_dir>/export)")
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / EXPORT_MARK).is_file():  # a training run, another tool's output, someone's files
            raise GrafitoError(f"--dest={dest} holds files export.py did not write (it marks its own folders with "
                               f"{EXPORT_MARK}): it is never replaced, --overwrite or not; choose another --dest")
        if not config["overwrite"]:
            raise GrafitoError(f"--dest={dest} holds an earlier export; pass --overwrite to replace it, or another "
                               f"--dest")
    return formats, hf_type, gguf_type, spec, name, dest


def main(argv=None):
    config = load_config(DEFAULTS, argv)
    formats, hf_type, gguf_type, spec, name, dest = parse_options(config)
    token = check_push(config["push"]) if config["push"] else None
    model, lora_model, source = load_for_export(spec, merged=bool({"hf", "gguf"} & set(formats)),
                                                unmerged="peft" in formats)
    info = read_run_info(source, config["eval"])
    any_model = model if model is not None else lora_model
    facts = describe(any_model, source, info, name, where=config["push"] or str(dest))
    print(f"exporting {source.folder or source.spec}" + (" (LoRA adapter)" if source.adapter else "")
          + f" as {', '.join(formats)} to {dest}")
    with atomic_dir(dest) as tmp:
        if "peft" in formats:
            write_peft(lora_model, tmp / "peft" if "hf" in formats else tmp, source)
        if "hf" in formats or "peft" in formats:
            write_tokenizer(tmp, any_model.config.block_size)
        if "hf" in formats:
            write_hf(model, tmp, hf_type)
        if "gguf" in formats:
            gguf_name = f"{name}-{gguf_type}.gguf"
            write_gguf(model, tmp / gguf_name, gguf_type, name, {"license": config["license"],
                                                               "base_model": facts["base_model"]},
                       write_output=config["gguf_output"])
            write_modelfile(tmp, gguf_name, name, model.config.block_size)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        card = model_card(any_model, info, facts, formats, files, config["license"])
        tmp.joinpath("README.md").write_text(card, encoding="utf-8")
        tmp.joinpath(EXPORT_MARK).write_text(json.dumps({"written_by": "grafito export.py", "source": spec}) + "\n")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and p.name != EXPORT_MARK)
    print(f"wrote {dest}: {', '.join(files)}")
    if config["push"]:
        push(dest, config["push"], token, config["private"])


if __name__ == "__main__":
    run_cli(main)
