"""Caption tokenizer: a BERT WordPiece tokenizer trained locally, any local BERT-style folder, or a CLIP BPE
tokenizer folder (a model converted from CLIP keeps CLIP's tokens)."""

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizer, CLIPTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

__all__ = ["DEFAULT_MAX_LENGTH", "SPECIAL_TOKENS", "TEXT_INPUT_NAMES", "TOKENIZER_FILES", "build_tokenizer", "load_tokenizer", "without_token_type_ids"]

DEFAULT_MAX_LENGTH = 256
# The order fixes the ids [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, which the text config defaults expect.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# What the text tower takes: it has no token types, so the tokenizer never emits token_type_ids
# (transformers' pipelines call the tokenizer directly and pass everything it returns to forward).
TEXT_INPUT_NAMES = ("input_ids", "attention_mask")
# What a tokenizer folder holds: the fast tokenizer's serialization (what `save_pretrained` of ours writes), a
# WordPiece vocabulary (e.g. a downloaded PubMedBERT) or a CLIP BPE vocabulary (with merges.txt beside it).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
# A BPE vocabulary and its merges: a CLIP tokenizer when tokenizer_config.json names no class.
BPE_FILES = ("vocab.json", "merges.txt")


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = DEFAULT_MAX_LENGTH,
) -> BertTokenizer:
    """Build a WordPiece vocabulary from `texts` and wrap it as a transformers `BertTokenizer`.

    The vocabulary is: the special tokens, every character of the corpus (word-initial and
    `##` continuation, so nothing is ever [UNK]), then whole words by frequency (ties
    alphabetically, at least `min_frequency` occurrences) up to `vocab_size`. Text is normalised
    and split exactly as BERT does (tokenizers' `BertNormalizer` and `BertPreTokenizer`).

    Deterministic by construction: the same corpus gives the same ids in every process. (The
    `tokenizers` WordPiece trainer does not: it numbers the `##` characters in hash-map order and
    breaks tied merges by id, so two runs on one corpus gave different vocabularies here.)
    """
    if model_max_length <= 2:
        raise ValueError(f"model_max_length must leave room for [CLS] and [SEP], got {model_max_length}")
    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                lowercase=lowercase)
    splitter = BertPreTokenizer()
    counts: Counter[str] = Counter()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    if not counts:
        raise ValueError("texts is empty: a tokenizer needs a caption corpus to learn from")
    characters = sorted({character for word in counts for character in word})
    vocab = SPECIAL_TOKENS + characters + [f"##{character}" for character in characters]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special tokens and the corpus's "
            f"{len(characters)} characters (x2 with their ## forms): use at least {len(vocab)}"
        )
    known = set(vocab)
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in known), key=lambda w: (-counts[w], w))
    vocab += words[: vocab_size - len(vocab)]
    return without_token_type_ids(BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=lowercase,
        strip_accents=lowercase,
        model_max_length=model_max_length,
    ))


def load_tokenizer(path: str | Path, model_max_length: int = DEFAULT_MAX_LENGTH) -> PreTrainedTokenizerBase:
    """Load a local tokenizer folder: BERT-style (ours, or e.g. a downloaded PubMedBERT: needs a pad and a
    [CLS] token) or CLIP's BPE (no [CLS]: needs a pad, a start- and an end-of-text token; it pads with
    its end-of-text token, as CLIP does).

    Folders that do not state a usable `model_max_length` (transformers then reports a huge
    sentinel) get `model_max_length`, so truncation always applies.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r} (expected {' or '.join(TOKENIZER_FILES)}: a folder saved by "
            f"RegionMedCLIPProcessor / the tokenizer holds tokenizer.json, a BERT download vocab.txt, a CLIP "
            f"download vocab.json and merges.txt); "
            f"it holds {sorted(entry.name for entry in path.iterdir())[:10]}")
    tokenizer = _tokenizer_class(path).from_pretrained(path)
    if tokenizer.model_max_length is None or tokenizer.model_max_length > 100_000:
        tokenizer.model_max_length = model_max_length
    bert_style = ("pad_token", "cls_token")
    clip_style = ("pad_token", "bos_token", "eos_token")
    missing = [token for token in bert_style if getattr(tokenizer, token) is None]
    if missing and tokenizer.cls_token is None:
        missing = [token for token in clip_style if getattr(tokenizer, token) is None]
    if missing:
        raise ValueError(f"the tokenizer in {str(path)!r} has no {' / '.join(missing)}; a BERT-style tokenizer "
                         f"({' + '.join(bert_style)}) or a CLIP-style one ({' + '.join(clip_style)}) is required")
    return without_token_type_ids(tokenizer)  # a BERT folder would also emit token_type_ids


def _tokenizer_class(path: Path) -> type[PreTrainedTokenizerBase]:
    """The class `tokenizer_config.json` names (without one: CLIP's for a BPE vocabulary with its merges,
    else BERT's). Not `AutoTokenizer`: it first reads
    the folder's `config.json`, and for a saved RegionMed-CLIP model folder (remote code) that asks on
    stdin whether to trust the code, blocking a batch job."""
    config_file = path / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    found = tokenizer_class_from_name(name) if name else None
    if name and found is None:
        raise ValueError(f"{str(config_file)!r} names tokenizer_class {name!r}, which transformers does not know")
    if found is None and all((path / name).is_file() for name in BPE_FILES):
        return CLIPTokenizer
    return found or BertTokenizer


def without_token_type_ids(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer`, now emitting only `TEXT_INPUT_NAMES`, and saving itself so (the init kwargs are
    what `save_pretrained` writes)."""
    tokenizer.model_input_names = list(TEXT_INPUT_NAMES)
    tokenizer.init_kwargs["model_input_names"] = list(TEXT_INPUT_NAMES)
    return tokenizer
