"""lm-evaluation-harness on any model source `load_model` opens (our `.ckpt`, a LoRA fine-tune's, a GPT-2 folder, a
hub name), without exporting it: an `lm_eval.api.model.LM` registered as `gpt_lightning`, whose requests are
scored by `scoring`, the functions `evaluate` uses. The `eval` extra installs lm-eval (pip install -e '.[eval]').

lm-eval 0.4 finds models in its own registry only (it reads no entry points for models), so importing this module
registers the model. Run lm-eval's own command line through it:

    python -m gpt_lightning.evaluation.lm_eval_adapter --model gpt_lightning \\
        --model_args ckpt_path=runs/pretrain_cpu/version_0/checkpoints/last.ckpt,batch_size=8 --tasks hellaswag

or, from Python, import it and call `lm_eval.simple_evaluate(model="gpt_lightning", ...)`.

How requests map to our scoring (docs/evaluation.md, "lm-evaluation-harness"):
- loglikelihood (context, continuation): the requests of one context are the choices of one item
  (`score_choices`): the context runs once, its continuations after it. Trailing whitespace of the context moves
  to the front of the continuation, as lm-eval's Hugging Face model does, and the two are encoded apart.
- loglikelihood_rolling (text,): `score_text`'s windows of block_size tokens. Our models have no
  beginning-of-text token, so the text's first token, which nothing predicts, is not scored.
- generate_until (context, gen_kwargs): `greedy_until`, up to the first `until` string or `max_gen_toks` tokens.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models (hf, ...): its registry imports them only while it is empty
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from gpt_lightning.evaluation.run import describe_model
from gpt_lightning.evaluation.scoring import evaluating, greedy_until, score_choices, score_text
from gpt_lightning.evaluation.tasks import ChoiceItem
from gpt_lightning.sources import load_model

logger = logging.getLogger(__name__)
MODEL_NAME = "gpt_lightning"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's Hugging Face model's default


class GPTLightningLM(LM):
    """One of our model sources as an lm-eval model: `--model_args ckpt_path=C[,batch_size=N][,device=D]`.

    Args:
        ckpt_path: The model: one of our checkpoints (a LoRA fine-tune's too, its updates merged), a Hugging Face
            GPT-2 folder, or a hub name such as `gpt2`.
        batch_size: Rows per forward pass: the continuations of one context, or a text's windows (unset: 8).
            `auto` is not supported: give a number. A model argument wins over lm-eval's `--batch_size`, which
            its command line always sets (default 1).
        device: Where the model runs: cpu (unset), cuda, cuda:1, mps. A model argument wins over lm-eval's
            `--device`, whose default (cuda:0) means the CPU where CUDA is not available, as for lm-eval's models.
        max_gen_toks: The most tokens a generation decodes where the task does not say (`max_gen_toks`).
        max_batch_size: lm-eval's limit for `--batch_size auto`; accepted and unused.
    """

    def __init__(
        self,
        ckpt_path: str,
        batch_size: int | str | None = None,
        device: str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _positive_int("batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.ckpt_path = str(ckpt_path)  # lm-eval reads `ckpt_path=123` as a number
        self._device = device or "cpu"
        self.model, self.tokenizer = load_model(self.ckpt_path, merge_lora=True)
        self.model.to(self._device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> GPTLightningLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> GPTLightningLM:
        """The model of `--model_args` (arg_dict), with lm-eval's own settings (`--batch_size`, `--device`) where
        the model arguments leave them out: lm-eval's models take one or the other, and fail on both."""
        given = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if "device" in given and torch.device(given["device"]).type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command line says cuda:0 unless told otherwise; its own models then run on the CPU too
            logger.warning("lm-eval's --device %s: CUDA is not available, the model runs on the CPU.", given["device"])
            given["device"] = "cpu"
        return cls(**arg_dict, **given)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval's results record of the model (under "config"): its source, weights' sha256, step, shape."""
        return {"gpt_lightning": describe_model(self.ckpt_path, self.tokenizer)}

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-likelihood in nats, whether greedy decoding writes it) of each (context, continuation)."""
        by_context: dict[str, list[int]] = {}  # the requests of one context: the choices of one item
        pairs = []
        for i, request in enumerate(requests):
            context, continuation = _moved_whitespace(*request.args)
            if not context:
                raise ValueError(
                    f"lm-eval request {i} asks for the log-likelihood of {continuation[:40]!r} after no context: our "
                    "models have no beginning-of-text token to condition on. Score whole texts with a "
                    "loglikelihood_rolling task, or give the task a context."
                )
            pairs.append((context, continuation))
            by_context.setdefault(context, []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        items = [
            ChoiceItem(context, tuple(pairs[i][1] for i in indices), 0, f"lm-eval request {indices[0]}")
            for context, indices in by_context.items()
        ]
        scores = score_choices(self.model, self.tokenizer, items, self.batch_size)
        for indices, score in zip(by_context.values(), scores, strict=True):
            for i, loss, greedy in zip(indices, score.losses, score.greedy, strict=True):
                results[i] = (-loss, greedy)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """The log-likelihood in nats of each text, every token after the first scored once (`score_text`)."""
        results = []
        for i, request in enumerate(requests):
            (text,) = request.args
            windows = score_text(self.model, self.tokenizer, text, self.batch_size, where=f"lm-eval request {i}")
            results.append(-sum(w.bits for w in windows) * math.log(2))
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The greedy continuation of each context, cut before the first of its `until` strings."""
        with evaluating(self.model):
            return [self._generate(f"lm-eval request {i}", *request.args) for i, request in enumerate(requests)]

    def _generate(self, where: str, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs["do_sample"]:
            raise ValueError(
                f"{where} asks for sampling ({gen_kwargs}): the gpt_lightning model decodes greedily only. Drop "
                "do_sample and temperature from the task's generation_kwargs (or --gen_kwargs)."
            )
        self.tokenizer.check(context, f"{where}: the context")
        prompt = self.tokenizer.encode(context)
        return greedy_until(self.model, self.tokenizer, prompt, kwargs["until"], kwargs["max_gen_toks"])


# By its module's name, not the class: run as `python -m`, this file is __main__ as well, and both register the same.
model_registry.register(MODEL_NAME, target="gpt_lightning.evaluation.lm_eval_adapter:GPTLightningLM")


def _moved_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention (and its Hugging Face model's): a context's trailing whitespace belongs to the
    continuation, where a BPE tokenizer reads it as the start of the next word."""
    kept = context.rstrip()
    return kept, context[len(kept) :] + continuation


def _positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r} (auto is not supported).") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}.")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with the gpt_lightning model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
