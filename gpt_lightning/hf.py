"""Hugging Face GPT-2 folders in and out. Out: our GPT as `config.json`, `model.safetensors` and its
vocabulary, so that `transformers.GPT2LMHeadModel.from_pretrained(folder)` gives the same logits. In: a
GPT-2 folder (or a hub name such as `gpt2`) as our GPT and its tokenizer. Plain torch; `safetensors` and
`huggingface_hub` are imported where they are used (the `hf` extra); `transformers` is never needed.

The two models are one architecture with other names. Hugging Face's GPT-2 keeps its projections in
`Conv1D` layers, whose weights are stored (in, out) where `nn.Linear` stores (out, in); it always has
biases, so a model trained without them exports zeros; its head is tied to the token embedding unless
`tie_word_embeddings` is false, as ours. Every field of a folder's config.json is read, ignored or refused
by one table, `GPT2_CONFIG_FIELDS`: a folder whose GPT-2 computes something else than ours never loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gpt_lightning.hub import HUB_NAMES
from gpt_lightning.hub import hf_gpt2_folder as hf_gpt2_folder  # its old home
from gpt_lightning.lora import plain_state_of
from gpt_lightning.model import GPT, GPTConfig
from gpt_lightning.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored transposed by Hugging Face
LAYER_NORMS = ("ln_1", "ln_2")


def gpt2_names(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """The one table of GPT-2's weights, read both ways (export and load): (our name, Hugging Face's name,
    whether Hugging Face stores it transposed). Every layer has its biases there; a tied head is not stored."""
    layers = [f"h.{i}.{part}" for i in range(config.n_layer) for part in (*LAYER_NORMS, *CONV1D)]
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False)]
    names += [(f"{layer}.{kind}", f"transformer.{layer}.{kind}", kind == "weight" and layer.endswith(CONV1D))
              for layer in [*layers, "ln_f"] for kind in ("weight", "bias")]  # fmt: skip
    return names if config.tie_embeddings else [*names, ("lm_head.weight", "lm_head.weight", False)]


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
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,  # a character vocabulary has no special tokens
        "eos_token_id": None,
    }


def hf_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights the model computes with (a LoRA model's updates merged) under Hugging Face GPT-2's names and
    layouts. A tied head is not stored, nor the vocabulary's padding rows: a GPT-2 of exactly its tokens, whose
    generate cannot write an id its tokenizer lacks."""
    ours, theirs = plain_state_of(model), {}
    for name in ("wte.weight", "lm_head.weight"):
        ours[name] = ours[name][: model.config.vocab_size]
    for our_name, their_name, transposed in gpt2_names(model.config):
        if our_name in ours:
            theirs[their_name] = ours[our_name].t() if transposed else ours[our_name]  # (out, in) -> (in, out)
        else:  # a bias of a model trained without them
            theirs[their_name] = torch.zeros(ours[our_name.removesuffix(".bias") + ".weight"].shape[0])
    # safetensors stores each tensor once and contiguous: no views, no shared storage.
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in theirs.items()}


def export_hf_gpt2(model: GPT, tokenizer: Tokenizer, output: str | Path, chat_template: str | None = None) -> Path:
    """Writes `output` as a Hugging Face GPT-2 folder of the weights `model` computes with (a LoRA model's
    updates merged), whole or not at all: an existing folder with files in it is never overwritten. A BPE
    tokenizer goes to `tokenizer.json`; characters go to `vocab.json` ({character: id}), so that text maps to
    ids without our code: `ids = [vocab[c] for c in text]`. A fine-tune's `chat_template` (Jinja) goes to
    `tokenizer_config.json`, where transformers' `apply_chat_template` reads it."""
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
        if chat_template is not None:
            described: dict[str, str] = {"chat_template": chat_template}
            if isinstance(tokenizer, BPETokenizer):  # what AutoTokenizer builds from tokenizer.json
                described["tokenizer_class"] = "PreTrainedTokenizerFast"
            text = json.dumps(described, ensure_ascii=False, indent=2) + "\n"
            (staging / "tokenizer_config.json").write_text(text, encoding="utf-8")
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# Hugging Face's names for GPT-2's GELU: "gelu_new" (its default) is the tanh approximation.
HF_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class Only:
    """A field refused unless it has this value, the only one our GPT computes (absent: transformers' default,
    which is this value)."""

    value: Any


HONOURED = "honoured"  # read into our config, and checked there
IRRELEVANT = "irrelevant"  # changes nothing our model computes in eval mode
# Every field of transformers' GPT2Config (its to_dict(), and the keys older versions wrote), by what it does
# to the forward pass. A key not in this table is refused: a later transformers may compute something with it.
GPT2_CONFIG_FIELDS: dict[str, Any] = {
    # The model: read into GPTConfig.
    "model_type": HONOURED,  # gpt2
    "vocab_size": HONOURED,
    "n_positions": HONOURED,  # block_size, which a fine-tune may crop
    "n_embd": HONOURED,
    "n_layer": HONOURED,
    "n_head": HONOURED,
    "n_inner": HONOURED,  # the MLP's width: None or 4 x n_embd, ours; another width is refused
    "activation_function": HONOURED,  # HF_GELU's; another activation is refused
    "tie_word_embeddings": HONOURED,  # GPTConfig.tie_embeddings
    # What our GPT computes, and nothing else.
    "layer_norm_epsilon": Only(1e-5),
    "scale_attn_weights": Only(True),  # scores divided by sqrt(head size)
    "scale_attn_by_inverse_layer_idx": Only(False),  # and by the layer's index + 1 (Mistral's GPT-2s)
    "add_cross_attention": Only(False),  # a decoder of an encoder-decoder: layers and weights ours lack
    "pruned_heads": Only({}),  # older transformers' pruned attention heads: other shapes
    # Changes nothing in eval: dropout is model.dropout's, and only in training.
    "resid_pdrop": IRRELEVANT,
    "embd_pdrop": IRRELEVANT,
    "attn_pdrop": IRRELEVANT,
    # Numerics only: the attention scores scaled before the matmul and kept in float32 under autocast, the same
    # function (a test compares the logits); ours are float32 unless trainer.precision says otherwise.
    "reorder_and_upcast_attn": IRRELEVANT,
    "chunk_size_feed_forward": IRRELEVANT,  # the MLP in chunks: the same values
    "dtype": IRRELEVANT,  # the weights' dtype: ours are loaded into float32
    "torch_dtype": IRRELEVANT,
    "torchscript": IRRELEVANT,  # older transformers cloned the tied head for TorchScript: the same values
    # Initialisation, generation, other heads (classification, GPT2DoubleHeads' summary), outputs, bookkeeping.
    "initializer_range": IRRELEVANT,
    "summary_type": IRRELEVANT,
    "summary_use_proj": IRRELEVANT,
    "summary_activation": IRRELEVANT,
    "summary_proj_to_labels": IRRELEVANT,
    "summary_first_dropout": IRRELEVANT,
    "id2label": IRRELEVANT,
    "label2id": IRRELEVANT,
    "num_labels": IRRELEVANT,
    "_num_labels": IRRELEVANT,
    "problem_type": IRRELEVANT,
    "finetuning_task": IRRELEVANT,
    "bos_token_id": IRRELEVANT,
    "eos_token_id": IRRELEVANT,
    "pad_token_id": IRRELEVANT,
    "sep_token_id": IRRELEVANT,
    "decoder_start_token_id": IRRELEVANT,
    "tokenizer_class": IRRELEVANT,
    "prefix": IRRELEVANT,
    "task_specific_params": IRRELEVANT,
    "n_ctx": IRRELEVANT,  # older configs' copy of n_positions, which transformers reads instead
    "n_special": IRRELEVANT,  # in the hub's gpt2-medium and larger: read by no GPT-2 of transformers
    "predict_special_tokens": IRRELEVANT,
    "use_cache": IRRELEVANT,
    "output_hidden_states": IRRELEVANT,
    "output_attentions": IRRELEVANT,
    "return_dict": IRRELEVANT,
    "is_encoder_decoder": IRRELEVANT,  # read by generate, not by GPT-2's layers
    "is_decoder": IRRELEVANT,
    "tie_encoder_decoder": IRRELEVANT,
    "cross_attention_hidden_size": IRRELEVANT,
    "gradient_checkpointing": IRRELEVANT,
    "use_bfloat16": IRRELEVANT,
    "tf_legacy_loss": IRRELEVANT,
    "architectures": IRRELEVANT,  # the class that saved it: the weights are what they are
    "transformers_version": IRRELEVANT,
    "_name_or_path": IRRELEVANT,
    "_commit_hash": IRRELEVANT,
    "_attn_implementation_autoset": IRRELEVANT,
    # transformers 4's generation settings in the model config (later in generation_config.json).
    **dict.fromkeys(
        ("max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
         "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
         "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
         "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
         "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"),
        IRRELEVANT,
    ),
}  # fmt: skip


def cropped(config: GPTConfig, block_size: int | None, source: str | Path, option: str = "block_size") -> GPTConfig:
    """A GPT-2's config with its position table cropped to `block_size` (unset: all of it), never extended."""
    if block_size is None:
        return config
    if block_size > config.block_size:
        raise ValueError(f"{option} {block_size} exceeds the {config.block_size} positions of {source}: "
                         f"use {config.block_size} or less.")  # fmt: skip
    return replace(config, block_size=block_size)


def config_of_hf_gpt2(folder: str | Path, block_size: int | None = None) -> GPTConfig:
    """Our config of the GPT-2 in a Hugging Face folder, from its config.json, or a one-line error that names
    the fields our GPT would compute otherwise (GPT2_CONFIG_FIELDS). `block_size` crops the position table,
    never extends it."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face GPT-2 folder: it needs config.json and model.safetensors."
        )
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{folder} holds a {hf.get('model_type')!r} model, not GPT-2 (config.json's model_type).")
    n_embd = hf["n_embd"]

    def computes_ours(field: str, value: Any) -> bool:
        rule = GPT2_CONFIG_FIELDS[field]
        if isinstance(rule, Only):
            return value == rule.value
        if field == "activation_function":
            return value in HF_GELU
        return field != "n_inner" or value in (None, 4 * n_embd)

    def shown(fields: list[str]) -> str:  # as config.json writes them
        return ", ".join(f"{field}={json.dumps(hf[field])}" for field in fields)

    unknown = [field for field in hf if field not in GPT2_CONFIG_FIELDS]
    refused = [field for field in hf if field in GPT2_CONFIG_FIELDS and not computes_ours(field, hf[field])]
    if refused:
        raise ValueError(
            f"{config_path} has {shown(refused)}: our GPT computes GELU, an MLP of 4 x n_embd, LayerNorm epsilon "
            "1e-5 and attention scores scaled by 1/sqrt(head size) only, so its logits would differ. Use another "
            "GPT-2 folder."
        )
    if unknown:
        raise ValueError(
            f"{config_path} has {shown(unknown)}, unknown to this loader (from a later transformers?): it may change "
            "what the model computes. Delete them from config.json if they do not, or use another GPT-2 folder."
        )
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=n_embd, bias=True,
                       gelu=HF_GELU[hf.get("activation_function", "gelu_new")],
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))  # fmt: skip
    return cropped(config, block_size, folder)


def gpt_from_hf_gpt2(folder: str | Path, block_size: int | None = None) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 folder (`config.json`, `model.safetensors`), as
    nanoGPT's `from_pretrained` does: the Conv1D weights transposed back, Hugging Face's other buffers
    (attention masks) left out. `block_size` crops the position table, never extends it."""
    config = config_of_hf_gpt2(folder, block_size)
    model = GPT(config)
    load_hf_gpt2_weights(model, folder)
    return model.eval()


def load_hf_gpt2_weights(model: GPT, folder: str | Path) -> None:
    """Loads a Hugging Face GPT-2 folder's weights into `model`, built from its config (its position table
    cropped, perhaps)."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError("loading Hugging Face weights needs safetensors: pip install -e '.[hf]'") from err
    # Saved with or without the "transformer." prefix, depending on the class that saved them.
    weights_path = Path(folder) / "model.safetensors"
    theirs = {k.removeprefix("transformer."): v for k, v in load_file(str(weights_path)).items()}
    try:
        model.load_state_dict(_from_hf_names(theirs, model.config))
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{weights_path} does not hold the GPT-2 weights config.json describes ({err}).") from None


def is_hf_gpt2(path: str | Path) -> bool:
    """Whether `path` names a Hugging Face GPT-2 (a hub name or a folder) rather than one of our .ckpt files."""
    return str(path) in HUB_NAMES or Path(path).is_dir()


def _from_hf_names(theirs: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    ours = {}
    for our_name, their_name, transposed in gpt2_names(config):
        weight = theirs[their_name.removeprefix("transformer.")]
        ours[our_name] = weight.t() if transposed else weight  # (in, out) -> (out, in)
    ours["wpe.weight"] = ours["wpe.weight"][: config.block_size]
    # A tied head is the embedding, whatever a folder stores beside it (transformers ties it the same way).
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    return ours


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
