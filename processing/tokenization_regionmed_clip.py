"""Caption tokenizer: a BERT WordPiece tokenizer trained locally, or any local BERT-style folder."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import BertWordPieceTokenizer
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

__all__ = ["DEFAULT_MAX_LENGTH", "SPECIAL_TOKENS", "build_tokenizer", "load_tokenizer"]

DEFAULT_MAX_LENGTH = 256
# The order fixes the ids [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, which the text config defaults expect.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = DEFAULT_MAX_LENGTH,
) -> BertTokenizer:
    """Train a WordPiece vocabulary on `texts` and wrap it as a transformers `BertTokenizer`.

    The vocabulary holds at most `vocab_size` entries (fewer when the corpus is small).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if model_max_length <= 2:
        raise ValueError(f"model_max_length must leave room for [CLS] and [SEP], got {model_max_length}")
    counted = 0

    def checked() -> Iterable[str]:
        nonlocal counted
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
            counted += 1
            yield text

    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    trainer.train_from_iterator(
        checked(), vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    if counted == 0:
        raise ValueError("texts is empty: a tokenizer needs a caption corpus to learn from")
    return BertTokenizer(
        vocab=trainer.get_vocab(),
        do_lower_case=lowercase,
        strip_accents=lowercase,
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | Path, model_max_length: int = DEFAULT_MAX_LENGTH) -> PreTrainedTokenizerBase:
    """Load a local BERT-style tokenizer folder (ours, or e.g. a downloaded PubMedBERT).

    Folders that do not state a usable `model_max_length` (transformers then reports a huge
    sentinel) get `model_max_length`, so truncation always applies.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.model_max_length is None or tokenizer.model_max_length > 100_000:
        tokenizer.model_max_length = model_max_length
    for token in ("pad_token", "cls_token"):
        if getattr(tokenizer, token) is None:
            raise ValueError(f"the tokenizer in {str(path)!r} has no {token}; a BERT-style tokenizer is required")
    return tokenizer
