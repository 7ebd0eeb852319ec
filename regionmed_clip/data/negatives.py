"""Rule-based hard-negative captions for radiology-style English reports.

A hard negative is the positive caption with one small, fluent edit that changes its clinical meaning, so the
text encoder has to read the detail (side, site, presence, size, finding) rather than the overall topic.

Every rule matches whole words only (regex ``\\b`` boundaries), so "leftover", "rightward", "uppermost",
"enlarged" and "bilateral" are never edited; a hyphen is a word boundary, so "left-sided" -> "right-sided".
Case is kept per word: "left" -> "right", "Left" -> "Right", "LEFT" -> "RIGHT".

Edits must change what the caption affirms. Text from a negation cue ("no", "not", "without", "negative for",
"absence of", "free of") to the end of its sentence is in negated scope, and editing only there can leave a
true statement ("No effusion." -> "No edema."), so the swap and finding rules apply only when at least one
edited word lies outside negated scope. A result that states the same sentences as the positive in another
order ("... right upper zone. ... right lower zone." swapped upper <-> lower) is not a negative either.

Rules (``RULES``), each returning ``None`` from ``apply_rule`` when it does not apply or would change nothing:

``laterality``
    left <-> right, every occurrence swapped simultaneously ("left nodule and right effusion" ->
    "right nodule and left effusion").
``location``
    upper <-> lower, superior <-> inferior, anterior <-> posterior, proximal <-> distal, apical <-> basal,
    apex <-> base, apices <-> bases, superiorly <-> inferiorly, anteriorly <-> posteriorly, basilar -> apical;
    every occurrence swapped simultaneously. "middle" is left alone.
``negation``
    Flips the presence of one statement: the earliest match in the caption among these patterns (ties go to
    the earlier pattern in this list):

    1. "not seen|identified|visualized|visualised|demonstrated|present|noted|evident|appreciated|detected"
       -> drop "not" ("is not seen" -> "is seen").
    2. "there is no X" -> "there is a/an X" (no article before "evidence", or when "evidence" is the next but
       one word); "there are no X" -> "there are X". "no longer" is never touched.
    3. "without" -> "with".
    4. "negative for" <-> "positive for".
    5. "no X" -> "X" (a sentence-initial "No pneumothorax." -> "Pneumothorax.").
    6. "there is|are [a|an|some] [size/quantity words] X" -> "there is|are no X" (size and quantity words
       such as "small", "mild", "multiple" are dropped: "There is a small nodule" -> "There is no nodule").
    7. "is|are|was|were <verb of rule 1>" -> insert "not" ("is seen" -> "is not seen").
    8. A sentence that opens with a noun phrase ending in a finding from ``vocabulary`` (the words before the
       first preposition, verb or punctuation, e.g. "Small nodule" in "Small nodule in the left upper zone.")
       -> "No" + the phrase without leading size/quantity words ("No nodule in the left upper zone."), unless
       the sentence already holds "no", "not", "without", "negative" or "absent" (no double negatives).

    Anything else ("normal", "unremarkable", "absent", "isn't") is not handled.
``severity``
    small <-> large, tiny -> large, mild <-> severe, moderate -> severe, minimal <-> extensive,
    mildly <-> severely, moderately -> severely, "moderate-sized"/"moderate sized" -> large;
    every occurrence swapped simultaneously.
``finding``
    One finding of ``vocabulary`` affirmed in the caption (outside negated scope) (whole words, case-insensitive, also in its simple
    plural: +s, +es after s/x/z/ch/sh, -y -> -ies, -sis -> -ses) is chosen with the rng and every occurrence
    of it is replaced by a different vocabulary term chosen with the rng, keeping number and case. Terms
    mentioned anywhere in the caption (negated ones included) are avoided as replacements while another is
    available. An empty vocabulary, or
    one with no term other than the one found, means the rule does not apply.

``make_hard_negatives`` tries the rules in a shuffled order seeded by (seed, caption), each with its own rng
seeded by (seed, rule, caption), so its output is deterministic, independent of Python's hash randomisation,
and the list for ``num=k`` is a prefix of the list for any larger ``num``. A result equal to the positive or
to an earlier result (the same sentences in any order, after collapsing whitespace and case-folding) is
dropped. When the single rules give
fewer than ``num`` negatives, pairs of rules are composed (the second applied to the first's output, pairs
taken in the shuffled order) to fill up; a caption no rule applies to gives ``[]``.
"""

import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

__all__ = ["FINDINGS", "REGION_FINDING_SWAPS", "RULES", "apply_rule", "make_hard_negatives", "region_hard_negatives"]

FINDINGS: tuple[str, ...] = (
    "nodule",
    "mass",
    "consolidation",
    "effusion",
    "calcification",
    "pneumothorax",
    "atelectasis",
    "opacity",
    "cardiomegaly",
    "edema",
    "fracture",
    "granuloma",
    "infiltrate",
    "lesion",
    "cyst",
    "cavity",
)

RULES: tuple[str, ...] = ("laterality", "location", "negation", "severity", "finding")

_LATERALITY = {"left": "right", "right": "left"}

_LOCATION = {
    "upper": "lower",
    "lower": "upper",
    "superior": "inferior",
    "inferior": "superior",
    "superiorly": "inferiorly",
    "inferiorly": "superiorly",
    "anterior": "posterior",
    "posterior": "anterior",
    "anteriorly": "posteriorly",
    "posteriorly": "anteriorly",
    "proximal": "distal",
    "distal": "proximal",
    "apical": "basal",
    "basal": "apical",
    "basilar": "apical",
    "apex": "base",
    "base": "apex",
    "apices": "bases",
    "bases": "apices",
}

_SEVERITY = {
    "moderate-sized": "large",
    "moderate sized": "large",
    "small": "large",
    "large": "small",
    "tiny": "large",
    "mild": "severe",
    "severe": "mild",
    "moderate": "severe",
    "minimal": "extensive",
    "extensive": "minimal",
    "mildly": "severely",
    "severely": "mildly",
    "moderately": "severely",
}

# Words dropped in front of a finding when its presence is negated: "no small nodule" reads oddly.
_QUALIFIERS = (
    "small",
    "large",
    "tiny",
    "mild",
    "moderate",
    "moderate-sized",
    "severe",
    "minimal",
    "extensive",
    "trace",
    "massive",
    "marked",
    "subtle",
    "slight",
    "multiple",
    "several",
    "numerous",
    "few",
)

_VERBS = r"(?:seen|identified|visualized|visualised|demonstrated|present|noted|evident|appreciated|detected)"

# Words that end the opening noun phrase of a sentence (negation pattern 8).
_PHRASE_STOPS = frozenset(
    "in on at of within with without along across from to into over under near involving measuring "
    "is are was were has have seen noted identified present and or which that".split()
)


def _match_case(source: str, replacement: str) -> str:
    """`replacement` in the case pattern of `source`: lower, Capitalised or UPPER."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


# A sentence runs to ".", ";" or a newline; a decimal point ("1.5 cm") does not end it.
_SENTENCE = re.compile(r"(?:[^.;\n]|(?<=\d)\.(?=\d))+")
_NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative\s+for|absence\s+of|free\s+of)\b", re.I)


def _statement_key(text: str) -> tuple[str, ...]:
    """The caption's normalised sentences, sorted: equal keys state the same things in any order."""
    return tuple(sorted(filter(None, (_normalise(sentence) for sentence in _SENTENCE.findall(text)))))


def _negated_spans(caption: str) -> list[tuple[int, int]]:
    """`(start, end)` character spans from each sentence's first negation cue to the sentence's end."""
    spans = []
    for sentence in _SENTENCE.finditer(caption):
        cue = _NEGATION_CUE.search(caption, sentence.start(), sentence.end())
        if cue is not None:
            spans.append((cue.start(), sentence.end()))
    return spans


def _affirmed(match: re.Match[str], negated: list[tuple[int, int]]) -> bool:
    return not any(start <= match.start() < end for start, end in negated)


def _swap_all(caption: str, mapping: dict[str, str]) -> str | None:
    """Replace every key of `mapping` in one pass, so swaps are simultaneous (left->right never re-swapped)."""
    # longest first so "moderate-sized" wins over "moderate"; spaces in keys match any whitespace
    keys = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in keys) + r")\b", re.I)

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        return _match_case(word, mapping[" ".join(word.lower().split())])

    negated = _negated_spans(caption)
    if not any(_affirmed(match, negated) for match in pattern.finditer(caption)):
        return None  # only negated statements would change: "No left effusion" -> "No right effusion" may hold
    result = pattern.sub(replace, caption)
    return result if result != caption else None


def _plural(term: str) -> str:
    """Simple English plural of a finding term (its last word)."""
    lower = term.lower()
    if lower.endswith("sis"):
        return term[:-2] + "es"
    if re.search(r"[^aeiou]y$", lower):
        return term[:-1] + "ies"
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return term + "es"
    return term + "s"


@lru_cache(maxsize=64)
def _vocabulary_forms(
    vocabulary: tuple[str, ...],
) -> tuple[tuple[str, ...], dict[str, tuple[str, bool]], re.Pattern[str] | None]:
    """Deduplicated terms, lowercase form -> (term, is_plural), and a whole-word regex of all forms."""
    terms: list[str] = []
    seen: set[str] = set()
    for raw in vocabulary:
        term = " ".join(raw.split())
        if term and term.lower() not in seen:
            seen.add(term.lower())
            terms.append(term)
    forms: dict[str, tuple[str, bool]] = {term.lower(): (term, False) for term in terms}
    for term in terms:
        # a singular term wins over another term's plural spelling
        forms.setdefault(_plural(term).lower(), (term, True))
    if not forms:
        return (), forms, None
    alternatives = sorted(forms, key=len, reverse=True)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in alternatives) + r")\b", re.I)
    return tuple(terms), forms, pattern


def _finding(caption: str, rng: random.Random, vocabulary: Sequence[str]) -> str | None:
    terms, forms, pattern = _vocabulary_forms(tuple(vocabulary))
    if pattern is None:
        return None
    negated = _negated_spans(caption)
    affirmed: list[str] = []
    mentioned: set[str] = set()
    for match in pattern.finditer(caption):
        term = forms[" ".join(match.group(0).lower().split())][0]
        mentioned.add(term)
        if term not in affirmed and _affirmed(match, negated):
            affirmed.append(term)
    if not affirmed:
        return None
    chosen = rng.choice(affirmed)
    others = [t for t in terms if t != chosen]
    fresh = [t for t in others if t not in mentioned]
    if not others:
        return None
    replacement = rng.choice(fresh or others)

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        term, plural = forms[" ".join(word.lower().split())]
        if term != chosen:
            return word
        return _match_case(word, _plural(replacement) if plural else replacement)

    result = pattern.sub(replace, caption)
    return result if result != caption else None


def _article(following: str) -> str:
    return "an" if following[:1].lower() in "aeiou" else "a"


_QUALIFIER_RE = "|".join(re.escape(q) for q in sorted(_QUALIFIERS, key=len, reverse=True))

# (pattern, replacement) for negation patterns 1-7; pattern 8 needs the vocabulary and is handled apart.
_NEGATION_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(rf"\b(not)\s+({_VERBS})\b", re.I),
        lambda m: _match_case(m.group(1), m.group(2)),
    ),
    (
        re.compile(r"\b(there\s+is)\s+no\s+(?!longer\b)(\w+)(\s+\w+)?", re.I),
        lambda m: (
            f"{m.group(1)} {m.group(2)}{m.group(3) or ''}"
            if "evidence" in (m.group(2).lower(), (m.group(3) or "").strip().lower())
            else f"{m.group(1)} {_article(m.group(2))} {m.group(2)}{m.group(3) or ''}"
        ),
    ),
    (
        re.compile(r"\b(there\s+are)\s+no\s+(?!longer\b)", re.I),
        lambda m: f"{m.group(1)} ",
    ),
    (
        re.compile(r"\bwithout\b", re.I),
        lambda m: _match_case(m.group(0), "with"),
    ),
    (
        re.compile(r"\b(negative|positive)(\s+for)\b", re.I),
        lambda m: _match_case(m.group(1), "positive" if m.group(1).lower() == "negative" else "negative") + m.group(2),
    ),
    (
        re.compile(r"\b(no)\s+(?!longer\b)([a-z])", re.I),
        lambda m: m.group(2).upper() if m.group(1)[0].isupper() else m.group(2),
    ),
    (
        re.compile(
            rf"\b(there\s+(?:is|are))\s+(?:(?:an?|some)\s+)?(?:(?:{_QUALIFIER_RE})\s+)*(?!no\b|not\b)(?=\w)", re.I
        ),
        lambda m: f"{m.group(1)} no ",
    ),
    (
        re.compile(rf"\b(is|are|was|were)\s+({_VERBS})\b", re.I),
        lambda m: f"{m.group(1)} {'NOT' if m.group(1).isupper() and m.group(2).isupper() else 'not'} {m.group(2)}",
    ),
)

_SENTENCE_START = re.compile(r"(?:^|[.;:!?]\s+)(?=[A-Za-z])")
_PHRASE_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_NEGATED_SENTENCE = re.compile(r"\b(?:no|not|without|negative|absent)\b", re.I)


def _opening_phrase(caption: str, vocabulary: Sequence[str]) -> tuple[int, str] | None:
    """Negation pattern 8: (position, replacement) for the first sentence opening with a finding phrase."""
    _, _, pattern = _vocabulary_forms(tuple(vocabulary))
    if pattern is None:
        return None
    qualifiers = set(_QUALIFIERS)
    for start_match in _SENTENCE_START.finditer(caption):
        start = start_match.end()
        clause = re.split(r"[,.;:!?()]", caption[start:], maxsplit=1)[0]
        # "Pneumothorax is not seen." is already negative: "No pneumothorax is not seen." would be a double negative
        if _NEGATED_SENTENCE.search(re.split(r"[.;!?]", caption[start:], maxsplit=1)[0]):
            continue
        words = list(_PHRASE_WORD.finditer(clause))
        if not words or words[0].group(0).lower() in {"there", "the"}:
            continue
        phrase: list[re.Match[str]] = []
        for word in words:
            # the phrase is contiguous words only: stop at a number, a stop word or anything between words
            if word.group(0).lower() in _PHRASE_STOPS or (phrase and clause[phrase[-1].end() : word.start()].strip()):
                break
            phrase.append(word)
        if not phrase or clause[: phrase[0].start()].strip():
            continue
        kept = phrase
        if kept[0].group(0).lower() in {"a", "an"}:
            kept = kept[1:]
        while kept and kept[0].group(0).lower() in qualifiers:
            kept = kept[1:]
        if not kept:
            continue
        text = clause[kept[0].start() : phrase[-1].end()]
        if not any(found.end() == len(text) for found in pattern.finditer(text)):
            continue
        first = kept[0].group(0)
        opening = phrase[0].group(0)
        if len(opening) > 1 and opening.isupper():
            prefix = "NO"  # an all-caps report stays all caps
        else:
            prefix = "No" if opening[0].isupper() else "no"
            if first[:1].isupper() and first[1:].islower():
                first = first.lower()  # "Right pleural effusion" -> "No right pleural effusion"; "PICC" kept
        return start, prefix + " " + first + caption[start + kept[0].end() :]
    return None


def _negation(caption: str, vocabulary: Sequence[str]) -> str | None:
    best: tuple[int, int, str] | None = None
    for index, (pattern, replace) in enumerate(_NEGATION_PATTERNS):
        match = pattern.search(caption)
        if match is not None and (best is None or match.start() < best[0]):
            best = (match.start(), index, caption[: match.start()] + replace(match) + caption[match.end() :])
    opening = _opening_phrase(caption, vocabulary)
    if opening is not None and (best is None or opening[0] < best[0]):
        best = (opening[0], len(_NEGATION_PATTERNS), caption[: opening[0]] + opening[1])
    return None if best is None else best[2]


def _check_caption(caption: object) -> None:
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")


def _check_vocabulary(vocabulary: object) -> None:
    # a bare string would be read as a vocabulary of single letters
    if isinstance(vocabulary, str):
        raise TypeError("vocabulary must be a sequence of str, not a str")


def apply_rule(caption: str, rule: str, rng: random.Random, vocabulary: Sequence[str] = FINDINGS) -> str | None:
    """Apply one named rule of `RULES` to `caption`; None when it does not apply or changes nothing."""
    _check_caption(caption)
    _check_vocabulary(vocabulary)
    if rule == "laterality":
        result = _swap_all(caption, _LATERALITY)
    elif rule == "location":
        result = _swap_all(caption, _LOCATION)
    elif rule == "negation":
        result = _negation(caption, vocabulary)
    elif rule == "severity":
        result = _swap_all(caption, _SEVERITY)
    elif rule == "finding":
        result = _finding(caption, rng, vocabulary)
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if result is None or _statement_key(result) == _statement_key(caption):
        return None
    return result


def make_hard_negatives(caption: str, num: int = 3, seed: int = 0, vocabulary: Sequence[str] = FINDINGS) -> list[str]:
    """Up to `num` distinct hard negatives of `caption`, deterministic for (caption, num, seed, vocabulary)."""
    _check_caption(caption)
    if isinstance(num, bool) or not isinstance(num, int):
        raise TypeError(f"num must be an int, got {type(num).__name__}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    _check_vocabulary(vocabulary)
    vocabulary = tuple(vocabulary)
    if num == 0:
        return []

    # str seeds go through sha512 in random.Random, so this never depends on PYTHONHASHSEED
    order = list(RULES)
    random.Random(f"order\x1f{seed}\x1f{caption}").shuffle(order)
    seen = {_statement_key(caption)}
    results: list[str] = []

    def keep(candidate: str | None) -> bool:
        key = None if candidate is None else _statement_key(candidate)
        if key is None or key in seen:
            return False
        seen.add(key)
        results.append(candidate)
        return len(results) >= num

    singles: dict[str, str] = {}
    for rule in order:
        negative = apply_rule(caption, rule, random.Random(f"{seed}\x1f{rule}\x1f{caption}"), vocabulary)
        if negative is not None:
            singles[rule] = negative
        if keep(negative):
            return results
    # not enough single edits: compose two rules, in the shuffled order, to fill up
    applicable = [rule for rule in order if rule in singles]
    for i, first in enumerate(applicable):
        for second in applicable[i + 1 :]:
            rng = random.Random(f"{seed}\x1f{first}+{second}\x1f{caption}")
            if keep(apply_rule(singles[first], second, rng, vocabulary)):
                return results
    return results


# Finding swaps per region caption in training: with five, a finding's look-alike is among its
# negatives in a small vocabulary, and the hardest one drives `negative_text_margin` (docs/TRAINING.md, 11).
REGION_FINDING_SWAPS = 5


@lru_cache(maxsize=65536)
def region_hard_negatives(caption: str, seed: int = 0, vocabulary: tuple[str, ...] = FINDINGS,
                          finding_swaps: int = REGION_FINDING_SWAPS) -> tuple[str, ...]:
    """Every single-rule negative of a region caption (one per rule of `RULES` that applies, in that
    order), with up to `finding_swaps` DISTINCT finding swaps in all; distinct, deterministic.

    A region caption is short ("small nodule in the left upper zone"), so each rule gives one edit of
    one attribute: side, zone, presence, size, finding. Pass the dataset's own lesion labels as
    `vocabulary` so that finding swaps name findings the images really show (harder than a random term);
    `finding_swaps = len(vocabulary) - 1` gives every other finding, so a look-alike is never left out.
    """
    _check_caption(caption)
    _check_vocabulary(vocabulary)
    if isinstance(finding_swaps, bool) or not isinstance(finding_swaps, int) or finding_swaps < 1:
        raise ValueError(f"finding_swaps must be a positive int, got {finding_swaps!r}")
    seen = {_statement_key(caption)}
    results: list[str] = []

    def add(rule: str, rng: random.Random) -> bool:
        negative = apply_rule(caption, rule, rng, vocabulary)
        if negative is None or _statement_key(negative) in seen:
            return False
        seen.add(_statement_key(negative))
        results.append(negative)
        return True

    swaps = 0
    for rule in RULES:
        added = add(rule, random.Random(f"{seed}\x1f{rule}\x1f{caption}"))
        swaps += added and rule == "finding"
    # More swaps with other seeds; a draw may repeat an earlier one, so allow a few draws per swap.
    for extra in range(1, 4 * len(vocabulary) + 1):
        if swaps >= finding_swaps:
            break
        swaps += add("finding", random.Random(f"{seed}\x1ffinding{extra}\x1f{caption}"))
    return tuple(results)
