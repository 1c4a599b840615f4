"""`python main.py generate`: text from a checkpoint alone, streamed to stdout.

The first sample of each test runs as a real subprocess; the variations run `main()` in this process
(`in_process=True`, the same code path without a new interpreter's imports)."""

from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_clean_error, assert_ok, cli

pytestmark = pytest.mark.slow


def generate(ckpt: Path, *args: str, in_process: bool = True):
    return cli("generate", f"--ckpt_path={ckpt}", *args, in_process=in_process)


def test_prints_the_prompt_and_the_generated_characters(pretrained: Path):
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    result = generate(ckpt, "--prompt=KING ARTHUR:", "--max_new_tokens=300", "--seed=1", in_process=False)
    assert_ok(result)
    assert result.stdout.startswith("KING ARTHUR:")
    assert len(result.stdout) == len("KING ARTHUR:") + 300 + 1  # and a final newline
    again = generate(ckpt, "--prompt=KING ARTHUR:", "--max_new_tokens=300", "--seed=1")
    assert again.stdout == result.stdout  # byte-identical for the same seed, in another process
    other = generate(ckpt, "--prompt=KING ARTHUR:", "--max_new_tokens=300", "--seed=2")
    assert other.stdout != result.stdout
    no_cache = generate(ckpt, "--prompt=KING ARTHUR:", "--max_new_tokens=300", "--seed=1", "--use_kv_cache=false")
    assert no_cache.stdout == result.stdout


def test_config_file_and_sampling_options(pretrained: Path, tmp_path: Path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("LADY BEATRICE:\n")
    result = cli(
        "generate", "--config", str(ROOT / "configs/generate.yaml"),
        f"--ckpt_path={pretrained / 'checkpoints' / 'last.ckpt'}", f"--prompt_file={prompt}", "--max_new_tokens=20",
        "--num_samples=2", "--top_k=5", "--top_p=0.9", in_process=True,
    )  # fmt: skip
    assert_ok(result)
    first, second = result.stdout.split("\n" + "-" * 40 + "\n")
    assert first.startswith("LADY BEATRICE:\n") and second.startswith("LADY BEATRICE:\n")
    assert len(first) == len("LADY BEATRICE:\n") + 20


@pytest.mark.parametrize(
    ("args", "patterns"),
    [
        (
            ["--prompt=QUIXOTE~"],
            [r"the prompt has 3 character\(s\) outside the model's \d+-character vocabulary: 'Q', 'X', '~'"],
        ),
        (["--temperature=-1"], ["temperature must be >= 0"]),
        (["--top_p=1.5"], [r"top_p must be in \(0, 1\]"]),
        (["--top_k=0"], ["top_k must be >= 1"]),
        (["--temperature=nan"], ['Parser key "temperature"']),  # the parser refuses non-finite floats itself
        (["--seed=-1"], [r"seed must be from 0 to 2\*\*64 - 1"]),
    ],
)
def test_bad_sampling_input_is_a_clear_error(pretrained: Path, args, patterns):
    assert_clean_error(generate(pretrained / "checkpoints" / "last.ckpt", *args), *patterns)


def test_a_tiny_temperature_prints_the_greedy_text(pretrained: Path):
    # 1e-40 once divided the logits into inf and NaN: a traceback. The limit of a tiny temperature is greedy.
    ckpt = pretrained / "checkpoints" / "last.ckpt"
    tiny = generate(ckpt, "--prompt=KING", "--max_new_tokens=40", "--temperature=1e-40")
    assert_ok(tiny)
    greedy = generate(ckpt, "--prompt=KING", "--max_new_tokens=40", "--temperature=0")
    assert tiny.stdout == greedy.stdout and len(tiny.stdout) == len("KING") + 40 + 1


def test_missing_or_foreign_checkpoints_are_clear_errors(tmp_path: Path):
    # As a user sees it: exit code 1 and the message on stderr, without a traceback.
    assert_clean_error(generate(tmp_path / "nope.ckpt", in_process=False), "nope.ckpt does not exist")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    assert_clean_error(generate(junk), "junk.ckpt is not a readable PyTorch checkpoint")
    import torch

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert_clean_error(generate(foreign), "foreign.ckpt is not a gpt-lightning checkpoint")
