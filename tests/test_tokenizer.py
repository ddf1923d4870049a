"""Tokenizer: the tiny stand-in round trip, Wan's cleaning, padding/truncation/mask, errors."""
import json

import pytest
import torch

from flf2v.models.config import get_preset
from flf2v.models.tokenizer import T5Tokenizer, clean, write_tiny_tokenizer

VOCAB = get_preset("tiny").t5.vocab


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "umt5", VOCAB)


def test_folder_loads_offline_with_exact_vocab(folder):
    from transformers import AutoTokenizer

    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(tok) == VOCAB and tok.vocab_size == VOCAB
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("a cat")["input_ids"][-1] == 1  # </s> appended, T5 style
    assert tok.convert_ids_to_tokens(tok("the dog")["input_ids"]) == ["\u2581the", "\u2581dog", "</s>"]


def test_deterministic(folder, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again", VOCAB)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert json.loads((again / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    with pytest.raises(ValueError, match="vocab_size 10"):
        write_tiny_tokenizer(tmp_path / "small", 10)


def test_padding_mask_and_truncation(folder):
    text_len = 12
    tok = T5Tokenizer(folder, text_len=text_len)
    long = " ".join(["cat"] * 30)
    with pytest.warns(UserWarning, match=f"31 tokens truncated to text_len={text_len}"):
        ids, mask = tok(["the dog", long, "镜头切换，镜头晃动"])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (3, text_len)
    # "the dog" -> ▁the ▁dog </s>, then <pad>=0 with mask 0
    assert mask[0].tolist() == [1] * 3 + [0] * (text_len - 3)
    assert ids[0, 2].item() == 1 and ids[0, 3:].eq(0).all()
    # truncated: full mask, </s> kept as the last token like HF truncation with special tokens
    assert mask[1].all() and ids[1, -1].item() == 1 and ids[1, :-1].ne(1).all()
    # Chinese falls to <unk>=2 in the tiny vocab, still a valid prompt
    assert ids[2, mask[2].bool()].tolist()[-1] == 1 and (ids[2] == 2).any()


def test_no_warning_when_it_fits(folder, recwarn):
    T5Tokenizer(folder, text_len=3)(["the dog"])  # exactly 3 tokens
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_cleaning(folder):
    assert clean("  a cat &amp;amp; a\tdog \n\n on   the  sea ") == "a cat & a dog on the sea"
    assert clean("sch\u00c3\u00b6n") == "sch\u00f6n"  # ftfy repairs mojibake
    tok = T5Tokenizer(folder, text_len=16)
    a, _ = tok(["the  cat &amp;amp; dog "])
    b, _ = tok("the cat & dog")
    assert torch.equal(a, b)


def test_missing_or_broken_folder(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        T5Tokenizer(missing)
    broken = tmp_path / "broken-tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(RuntimeError, match="broken-tok"):
        T5Tokenizer(broken)
