"""The zoo's character-level tokenizer, built with the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path

from evomerge.fitness.tasks import PAD, UNK, VOCAB


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character and no special tokens added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=".", model_max_length=64
    )


def save_tokenizer(path: Path) -> None:
    build_tokenizer().save_pretrained(path)


CHAR_IDS = {t: i for i, t in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """Fast encoding for training (the same ids the saved tokenizer gives)."""
    unk = CHAR_IDS[UNK]
    return [CHAR_IDS.get(c, unk) for c in text]
