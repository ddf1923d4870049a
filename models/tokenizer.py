"""umT5 tokenizer (a local Hugging Face folder) with Wan's prompt cleaning, plus a tiny stand-in.

Matches the official `HuggingfaceTokenizer(name, seq_len=text_len, clean="whitespace")` called with
`return_mask=True, add_special_tokens=True`: pad to text_len, truncate, `</s>` appended.
"""
from __future__ import annotations

import html
import json
import string
import warnings
from pathlib import Path

import ftfy
import regex
import torch

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def clean(text: str) -> str:
    """The official "whitespace" cleaning: ftfy, html unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
    def __init__(self, folder: str | Path, text_len: int = 512):
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot load a tokenizer from folder {str(folder)!r}: {e}") from e
        self.folder = folder
        self.text_len = text_len

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (ids, mask), both int64 [B, text_len]."""
        texts = [clean(t) for t in ([texts] if isinstance(texts, str) else texts)]
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for t, ids in zip(texts, full):
            if len(ids) > self.text_len:
                warnings.warn(f"prompt of {len(ids)} tokens truncated to text_len={self.text_len}: {t[:60]!r}...")
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()


def _tiny_vocab(vocab_size: int) -> list[tuple[str, float]]:
    """Deterministic Unigram vocab: T5 specials, single characters, a few words, then letter pairs."""
    singles = ["\u2581"] + [c for c in string.printable if not c.isspace()]
    words = ("a an the and of in on with to is are at by from for man woman girl boy cat dog bird car "
             "sky sea water tree city street light sun night day red blue green white black small big "
             "walks runs flies sits looks turns moves camera slow fast close view shot scene video "
             "frame first last smiling flying running beautiful style").split()
    pieces = dict.fromkeys([*SPECIALS, *singles, *("\u2581" + w for w in words)])
    letters = string.ascii_lowercase
    pairs = ("\u2581" + a + b for a in letters for b in letters)
    for p in pairs:
        if len(pieces) >= vocab_size:
            break
        pieces.setdefault(p)
    if len(pieces) < vocab_size or vocab_size < len(SPECIALS) + len(singles):
        raise ValueError(f"vocab_size {vocab_size} outside [{len(SPECIALS) + len(singles)}, {len(pieces)}]")
    # Unigram scores are log-probs: multi-character pieces beat spelling a word letter by letter.
    return [(p, 0.0 if p in SPECIALS else -10.0 if len(p) == 1 else -5.0) for p in list(pieces)[:vocab_size]]


def write_tiny_tokenizer(folder: str | Path, vocab_size: int) -> Path:
    """Write a small T5-style tokenizer (HF folder form, loadable offline by AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(_tiny_vocab(vocab_size), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens(list(SPECIALS))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right", "truncation_side": "right",
              "clean_up_tokenization_spaces": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder
