import pytest
import torch

from gpt_lightning.tokenizer import CharTokenizer


def test_vocabulary_is_sorted_and_round_trips():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab == "\n dehlorw"
    ids = tok.encode("hello")
    assert ids.dtype == torch.long and ids.tolist() == [4, 3, 5, 5, 6]
    assert tok.decode(ids) == "hello"


def test_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\) outside .*'x', 'z'"):
        tok.encode("abxcz")


def test_json_round_trip():
    tok = CharTokenizer.from_text("To be, or not to be: ünïcödé\n")
    again = CharTokenizer.from_json(tok.to_json())
    assert again == tok and again.vocab_size == tok.vocab_size


@pytest.mark.parametrize("vocab", ["", "aa", ["ab"]])
def test_invalid_vocabularies_are_rejected(vocab):
    with pytest.raises(ValueError):
        CharTokenizer(vocab)
