"""Hugging Face GPT-2 folders in and out. Out: our GPT as `config.json`, `model.safetensors` and its
vocabulary, so that `transformers.GPT2LMHeadModel.from_pretrained(folder)` gives the same logits. In: a
GPT-2 folder (or a hub name such as `gpt2`) as our GPT and its tokenizer. Plain torch; `safetensors` and
`huggingface_hub` are imported where they are used (the `hf` extra); `transformers` is never needed.

The two models are one architecture with other names. Hugging Face's GPT-2 keeps its projections in
`Conv1D` layers, whose weights are stored (in, out) where `nn.Linear` stores (out, in); it always has
biases, so a model trained without them exports zeros; its head is tied to the token embedding, as ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from gpt_lightning.data import is_local_rank_zero, raise_if_failed, record_failure
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored transposed by Hugging Face
LAYER_NORMS = ("ln_1", "ln_2")


def hf_gpt2_config(config: GPTConfig) -> dict:
    """config.json of the same model. Hugging Face's "gelu" is our exact GELU; its GPT-2 default, "gelu_new",
    is the tanh approximation."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": True,
        "bos_token_id": None,  # a character vocabulary has no special tokens
        "eos_token_id": None,
    }


def hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face GPT-2's names and layouts (the tied head is not stored)."""
    ours, n_embd = model.state_dict(), model.config.n_embd

    def bias(name: str, size: int) -> torch.Tensor:
        return ours.get(f"{name}.bias", torch.zeros(size))

    theirs = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    for i in range(model.config.n_layer):
        for norm in LAYER_NORMS:
            theirs[f"transformer.h.{i}.{norm}.weight"] = ours[f"h.{i}.{norm}.weight"]
            theirs[f"transformer.h.{i}.{norm}.bias"] = bias(f"h.{i}.{norm}", n_embd)
        for name in CONV1D:
            weight = ours[f"h.{i}.{name}.weight"]  # (out, in)
            theirs[f"transformer.h.{i}.{name}.weight"] = weight.t()  # (in, out)
            theirs[f"transformer.h.{i}.{name}.bias"] = bias(f"h.{i}.{name}", weight.shape[0])
    theirs["transformer.ln_f.weight"] = ours["ln_f.weight"]
    theirs["transformer.ln_f.bias"] = bias("ln_f", n_embd)
    # safetensors stores each tensor once and contiguous: no views, no shared storage.
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in theirs.items()}


def export_hf_gpt2(model: GPT, tokenizer: Tokenizer, output: str | Path) -> Path:
    """Writes `output` as a Hugging Face GPT-2 folder, whole or not at all: an existing folder with files in
    it is never overwritten. A BPE tokenizer goes to `tokenizer.json`; characters go to `vocab.json`
    ({character: id}), so that text maps to ids without our code: `ids = [vocab[c] for c in text]`."""
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("export needs safetensors: pip install -e '.[hf]'") from err
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty folder: export into a new folder.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        save_file(hf_gpt2_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = json.dumps(hf_gpt2_config(model.config), indent=2)
        (staging / "config.json").write_text(config + "\n", encoding="utf-8")
        if isinstance(tokenizer, BPETokenizer):
            (staging / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
        else:
            vocab = {char: i for i, char in enumerate(tokenizer.vocab)}
            vocab_json = json.dumps(vocab, ensure_ascii=False, indent=1) + "\n"
            (staging / "vocab.json").write_text(vocab_json, encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# Hugging Face's names for GPT-2's GELU: "gelu_new" (its default) is the tanh approximation.
HF_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def config_of_hf_gpt2(folder: str | Path, block_size: int | None = None) -> GPTConfig:
    """Our config of the GPT-2 in a Hugging Face folder, from its config.json. `block_size` crops the
    position table, never extends it."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face GPT-2 folder: it needs config.json and model.safetensors."
        )
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{folder} holds a {hf.get('model_type')!r} model, not GPT-2 (config.json's model_type).")
    gelu = HF_GELU.get(hf.get("activation_function", "gelu_new"))
    n_embd, positions = hf["n_embd"], hf["n_positions"]
    if gelu is None or (hf.get("n_inner") or 4 * n_embd) != 4 * n_embd or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(
            f"{folder}'s GPT-2 differs from ours: activation {hf.get('activation_function')!r}, MLP width "
            f"{hf.get('n_inner')}, LayerNorm epsilon {hf.get('layer_norm_epsilon')} (ours: GELU, 4 x n_embd, 1e-5)."
        )
    if block_size is not None and block_size > positions:
        raise ValueError(f"block_size {block_size} exceeds the {positions} positions {folder} was trained with: "
                         f"use {positions} or less.")  # fmt: skip
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=block_size or positions, n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=n_embd, bias=True, gelu=gelu)  # fmt: skip


def gpt_from_hf_gpt2(folder: str | Path, block_size: int | None = None) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 folder (`config.json`, `model.safetensors`), as
    nanoGPT's `from_pretrained` does: the Conv1D weights transposed back, Hugging Face's other buffers
    (attention masks) left out, the head tied. `block_size` crops the position table, never extends it."""
    config = config_of_hf_gpt2(folder, block_size)
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError("loading Hugging Face weights needs safetensors: pip install -e '.[hf]'") from err
    # Saved with or without the "transformer." prefix, depending on the class that saved them.
    weights_path = Path(folder) / "model.safetensors"
    theirs = {k.removeprefix("transformer."): v for k, v in load_file(str(weights_path)).items()}
    try:
        model = GPT(config)
        model.load_state_dict(_from_hf_names(theirs, config))
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{weights_path} does not hold the GPT-2 weights config.json describes ({err}).") from None
    return model.eval()


def is_hf_gpt2(path: str | Path) -> bool:
    """Whether `path` names a Hugging Face GPT-2 (a hub name or a folder) rather than one of our .ckpt files."""
    return str(path) in HUB_NAMES or Path(path).is_dir()


def _from_hf_names(theirs: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    ours = {"wte.weight": theirs["wte.weight"], "wpe.weight": theirs["wpe.weight"][: config.block_size]}
    for i in range(config.n_layer):
        for norm in LAYER_NORMS:
            for kind in ("weight", "bias"):
                ours[f"h.{i}.{norm}.{kind}"] = theirs[f"h.{i}.{norm}.{kind}"]
        for name in CONV1D:
            ours[f"h.{i}.{name}.weight"] = theirs[f"h.{i}.{name}.weight"].t()  # (in, out) -> (out, in)
            ours[f"h.{i}.{name}.bias"] = theirs[f"h.{i}.{name}.bias"]
    ours["ln_f.weight"], ours["ln_f.bias"] = theirs["ln_f.weight"], theirs["ln_f.bias"]
    ours["lm_head.weight"] = ours["wte.weight"]  # tied
    return ours


HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 weights on the hub
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def hf_gpt2_folder(name_or_folder: str | Path, files: list[str] = HUB_FILES, wait_s: float = 3600.0) -> Path:
    """A local GPT-2 folder: the folder itself, or a hub name's files in huggingface_hub's cache (downloaded
    on first use; `HF_HUB_OFFLINE=1` reads the cache only). As for the corpus, local rank 0 of each node
    downloads while the node's other processes wait for the files to be in the cache, and stop with local
    rank 0's error as soon as it records one."""
    if str(name_or_folder) not in HUB_NAMES:
        return Path(name_or_folder)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as err:
        raise ImportError("GPT-2 from the hub needs huggingface_hub: pip install -e '.[hf]'") from err
    repo = hub_repo(str(name_or_folder))
    downloads = is_local_rank_zero()
    # Only this node's processes wait for this one: the marker lies in a node-local folder, one per hub cache.
    cache = hashlib.sha256(str(Path(constants.HF_HUB_CACHE).resolve()).encode()).hexdigest()[:16]
    failure = Path(tempfile.gettempdir()) / "gpt-lightning" / f"{name_or_folder}.{cache}.{socket.gethostname()}.failed"
    if downloads:
        failure.unlink(missing_ok=True)  # an earlier launch's
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Path(snapshot_download(repo, allow_patterns=files, local_files_only=not downloads))
        except Exception as err:  # offline, not cached, or the hub refused: one line, and how to go on
            if downloads or time.monotonic() > deadline:
                error = FileNotFoundError(
                    f"could not get {name_or_folder} from the Hugging Face hub ({type(err).__name__}). Without "
                    f"network, give a local GPT-2 folder ({', '.join(files)}), or set HF_HUB_OFFLINE=1 with the "
                    "files already in huggingface_hub's cache."
                )
                if downloads:
                    record_failure(failure, error)  # the node's other processes stop with it at once
                raise error from None
        raise_if_failed(failure)
        time.sleep(1.0)  # local rank 0 is downloading them


def hub_repo(name: str) -> str:
    return f"openai-community/{name}"


def cached_hub_file(name: str, filename: str) -> Path | None:
    """A file of a hub GPT-2 (`gpt2`, ...) when huggingface_hub's local cache holds it, else None: a look in
    the cache, never a download. The legacy repo name (`gpt2`, as transformers once fetched it) counts too."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in (hub_repo(name), name):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):  # else None, or a marker that the hub said the file does not exist
            return Path(found)
    return None


def tokenizer_of_hf_folder(folder: Path, vocab_size: int) -> Tokenizer:
    """The folder's tokenizer: `tokenizer.json` (BPE), or the `vocab.json` of characters that `export`
    writes. It must fit the model's vocabulary."""
    tokenizer: Tokenizer
    if (folder / "tokenizer.json").is_file():
        tokenizer = BPETokenizer.from_file(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and not (folder / "merges.txt").exists():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if sorted(vocab.values()) != list(range(len(vocab))) or any(len(c) != 1 for c in vocab):
            raise ValueError(f"{folder}/vocab.json is not a character vocabulary: give the folder a tokenizer.json.")
        tokenizer = CharTokenizer(sorted(vocab, key=vocab.__getitem__))
    else:
        raise FileNotFoundError(f"{folder} has no tokenizer: add its tokenizer.json (or export's vocab.json).")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{folder}'s tokenizer has {tokenizer.vocab_size} tokens, more than the model's {vocab_size}: its ids "
            "would index past the embedding. Use the tokenizer the model was trained with."
        )
    return tokenizer
