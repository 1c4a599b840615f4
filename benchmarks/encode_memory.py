"""Peak memory of encoding text of every shape into the BPE token cache: the promise is bounded memory for any
text, so text without the usual line breaks must cost what ordinary text costs.

    python -m benchmarks.encode_memory --data-dir D                    # about 11 MB of each shape
    python -m benchmarks.encode_memory --data-dir D --tokenizer gpt2   # GPT-2's own BPE (needs its tokenizer.json)

Tiny Shakespeare, repeated to about `--size-mb`, is written in four shapes to a temporary folder: LF (as it
is), CRLF (Windows line ends), one line (every line break a space) and indented (every line begins with four
spaces). Each is encoded into a fresh token cache by `build_token_cache`, in a fresh process, so that its
peak resident memory (ru_maxrss) is its own; `at start` is that process's resident memory once the tokenizer
is loaded, before it reads the text. The tokenizer is `--tokenizer` (a tokenizer.json, or `gpt2`) or, unset,
a byte-level BPE trained here on the corpus with GPT-2's settings (GPT-2's own cannot be downloaded here).
The last column is each shape's peak per MB of text against LF's; the promise is at most 1.5.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import fresh_process_output, resident_bytes, trained_bpe
from gpt_lightning.data.corpus import corpus_path
from gpt_lightning.data.token_cache import build_token_cache
from gpt_lightning.tokenizer import BPETokenizer, tokenizer_from_spec

SHAPES = {
    "LF": lambda text: text,
    "CRLF": lambda text: text.replace("\n", "\r\n"),
    "one line": lambda text: text.replace("\n", " "),
    "indented": lambda text: "    " + text.replace("\n", "\n    "),
}


def encode_one(text_path: Path, tokenizer_json: Path, cache_dir: Path) -> dict[str, float]:
    """Run in a fresh process: its peak resident memory is then this encoding's alone."""
    bpe = BPETokenizer.from_file(tokenizer_json)
    at_start = resident_bytes()
    start = time.perf_counter()
    cache = build_token_cache(text_path, cache_dir, bpe=bpe)
    return {
        "seconds": time.perf_counter() - start,
        "tokens": cache.num_tokens,
        "at start": at_start,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--tokenizer", help="a tokenizer.json, or gpt2 (unset: a BPE trained on the corpus)")
    parser.add_argument("--vocab-size", type=int, default=50_257, help="of the BPE trained when --tokenizer is unset")
    parser.add_argument("--size-mb", type=float, default=11.0, help="about how much text of each shape")
    parser.add_argument("--work-dir", help="where the texts and caches go (default: a temporary folder)")
    parser.add_argument("--one", nargs=3, metavar=("TEXT", "TOKENIZER_JSON", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(encode_one(*map(Path, args.one))))
        return
    corpus = corpus_path(args.data_dir).read_text(encoding="utf-8")
    bpe = (
        tokenizer_from_spec(args.tokenizer)
        if args.tokenizer
        else trained_bpe(corpus_path(args.data_dir), args.vocab_size)
    )
    assert bpe is not None
    text = corpus * max(1, math.ceil(args.size_mb * 1e6 / len(corpus.encode())))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tokenizer_json = Path(tmp) / "tokenizer.json"
        tokenizer_json.write_text(bpe.tokenizer_json, encoding="utf-8")
        print(f"\n{bpe.vocab_size:,}-token BPE, about {args.size_mb:g} MB of each shape, each encoded in a fresh "
              "process:\n")  # fmt: skip
        print("| text | MB | tokens | s | at start (MB) | peak RSS (MB) | peak RSS per MB of text | ratio to LF |")
        print("|---|---|---|---|---|---|---|---|")
        lf_per_mb = None
        for i, (name, shape) in enumerate(SHAPES.items()):
            path = Path(tmp) / f"text-{i}.txt"
            path.write_text(shape(text), encoding="utf-8", newline="")
            megabytes = path.stat().st_size / 1e6
            one = ("--one", str(path), str(tokenizer_json), str(Path(tmp) / f"c{i}"))
            result = json.loads(fresh_process_output("benchmarks.encode_memory", *one))
            per_mb = result["peak"] / 1e6 / megabytes
            lf_per_mb = lf_per_mb or per_mb
            print(f"| {name} | {megabytes:.1f} | {result['tokens']:,} | {result['seconds']:.1f} | "
                  f"{result['at start'] / 1e6:,.0f} | {result['peak'] / 1e6:,.0f} | {per_mb:.1f} | "
                  f"{per_mb / lf_per_mb:.2f} |")  # fmt: skip
            path.unlink()


if __name__ == "__main__":
    main()
