"""Rule-based hard negatives: hand-written expectations per rule and the properties of `make_hard_negatives`."""

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regionmed_clip.data.negatives import FINDINGS, RULES, apply_rule, make_hard_negatives, region_hard_negatives


def rng() -> random.Random:
    return random.Random(0)


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Small nodule in the left upper zone.", "Small nodule in the right upper zone."),
        ("left nodule and right effusion", "right nodule and left effusion"),
        ("Left apical pneumothorax.", "Right apical pneumothorax."),
        ("RIGHT LOWER LOBE MASS.", "LEFT LOWER LOBE MASS."),
        ("Large left-sided pleural effusion.", "Large right-sided pleural effusion."),
        ("Bilateral effusions, larger on the right.", "Bilateral effusions, larger on the left."),
    ],
)
def test_laterality(caption, expected):
    assert apply_rule(caption, "laterality", rng()) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Small nodule in the left upper zone.", "Small nodule in the left lower zone."),
        ("Opacity in the upper and lower lobes.", "Opacity in the lower and upper lobes."),
        ("Apical pleural thickening.", "Basal pleural thickening."),
        ("Effusion at the right base.", "Effusion at the right apex."),
        ("Anterior rib fracture, posterior to the clip.", "Posterior rib fracture, anterior to the clip."),
        ("Nodule in the right middle lobe.", None),
    ],
)
def test_location(caption, expected):
    assert apply_rule(caption, "location", rng()) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Small nodule in the left upper zone.", "Large nodule in the left upper zone."),
        ("Mild cardiomegaly.", "Severe cardiomegaly."),
        ("Severe emphysema.", "Mild emphysema."),
        ("Moderate right pleural effusion.", "Severe right pleural effusion."),
        ("Moderate-sized right effusion.", "Large right effusion."),
        ("Minimal atelectasis and a tiny nodule.", "Extensive atelectasis and a large nodule."),
        ("Small effusion, large mass.", "Large effusion, small mass."),
        ("The heart is enlarged.", None),
    ],
)
def test_severity(caption, expected):
    assert apply_rule(caption, "severity", rng()) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("There is a small right pleural effusion.", "There is no right pleural effusion."),
        ("There is a small nodule.", "There is no nodule."),
        ("There are multiple nodules.", "There are no nodules."),
        ("No pneumothorax.", "Pneumothorax."),
        ("There is no pneumothorax.", "There is a pneumothorax."),
        ("There is no effusion.", "There is an effusion."),
        ("There is no evidence of pneumothorax.", "There is evidence of pneumothorax."),
        ("There are no nodules.", "There are nodules."),
        ("A nodule is seen in the right lung.", "No nodule is seen in the right lung."),
        ("The hilar density is seen again.", "The hilar density is not seen again."),
        ("Pneumothorax is not seen.", "Pneumothorax is seen."),
        ("Lungs are clear without consolidation.", "Lungs are clear with consolidation."),
        ("Negative for pneumothorax.", "Positive for pneumothorax."),
        ("Small nodule in the left upper zone.", "No nodule in the left upper zone."),
        ("Right pleural effusion.", "No right pleural effusion."),
        ("Heart normal. Mild cardiomegaly is noted.", "Heart normal. No cardiomegaly is noted."),
        ("There is no longer a pneumothorax.", None),
        ("Heart size normal.", None),
    ],
)
def test_negation(caption, expected):
    assert apply_rule(caption, "negation", rng()) == expected


def test_negation_avoids_double_negatives_and_uses_the_vocabulary():
    # the opening-phrase pattern needs a vocabulary finding at the end of the phrase
    assert apply_rule("Small density in the left upper zone.", "negation", rng()) is None
    assert apply_rule("Small density in the left upper zone.", "negation", rng(), vocabulary=["density"]) == (
        "No density in the left upper zone."
    )
    assert apply_rule("Pneumothorax not identified.", "negation", rng()) == "Pneumothorax identified."


def test_finding_swap_stays_in_vocabulary_and_differs():
    vocabulary = ("nodule", "mass", "effusion")
    for seed in range(20):
        result = apply_rule("Small nodule in the left upper zone.", "finding", random.Random(seed), vocabulary)
        match = re.fullmatch(r"Small (\w+) in the left upper zone\.", result)
        assert match and match.group(1) in {"mass", "effusion"}


def test_finding_swap_keeps_number_case_and_replaces_every_occurrence():
    result = apply_rule("Nodules in both lungs; the largest nodule is 5 mm.", "finding", rng(), ("nodule", "mass"))
    assert result == "Masses in both lungs; the largest mass is 5 mm."
    assert apply_rule("Opacity. Two opacities.", "finding", rng(), ("opacity", "cyst")) == "Cyst. Two cysts."
    # a term already in the caption is avoided while another exists
    result = apply_rule("Nodule and mass.", "finding", random.Random(3), ("nodule", "mass", "cyst"))
    assert result in {"Cyst and mass.", "Nodule and cyst."}


def test_finding_does_not_apply_without_an_alternative():
    assert apply_rule("Small nodule.", "finding", rng(), vocabulary=()) is None
    assert apply_rule("Small nodule.", "finding", rng(), vocabulary=("nodule", "NODULE")) is None
    assert apply_rule("Small nodule.", "finding", rng(), vocabulary=("mass", "cyst")) is None


def test_edits_only_inside_negated_statements_do_not_count():
    # "No effusion." -> "No edema." is still true: a negative must change what the caption affirms
    assert apply_rule("No pulmonary nodule. No mass. No effusion.", "finding", rng()) is None
    assert apply_rule("No left pleural effusion.", "laterality", rng()) is None
    assert apply_rule("Heart size normal; without upper zone opacity.", "location", rng()) is None
    assert apply_rule("Negative for large pneumothorax.", "severity", rng()) is None
    # the affirmed finding is swapped, never a negated one, and the replacement is not already mentioned
    for seed in range(20):
        result = apply_rule("Small nodule in the left upper zone. No mass. No effusion.", "finding",
                            random.Random(seed), ("nodule", "mass", "effusion", "cyst"))
        assert result == "Small cyst in the left upper zone. No mass. No effusion."
    # a decimal point does not end the sentence that a cue negates, nor start one
    assert apply_rule("No 1.5 cm left nodule.", "laterality", rng()) is None
    assert apply_rule("A 1.5 cm left nodule. No effusion.", "laterality", rng()) == (
        "A 1.5 cm right nodule. No effusion."
    )


def test_a_reordering_of_the_positive_is_not_a_negative():
    caption = "Pleural thickening in the right upper zone. Pleural thickening in the right lower zone."
    assert apply_rule(caption, "location", rng()) is None
    for negative in make_hard_negatives(caption, num=6):
        assert sorted(negative.split(". ")) != sorted(caption.split(". "))


def test_normal_synthetic_reports_get_no_true_negatives():
    from regionmed_clip.data.synthetic import generate_rows

    normal = [row for row, _ in generate_rows(40, seed=0) if not row["regions"]]
    assert normal
    for row in normal:
        for negative in row["negative_captions"]:
            # every sentence of a normal report is negated, so a negative has to affirm something
            assert any(not sentence.strip().lower().startswith("no ") for sentence in negative.split(".")
                       if sentence.strip()), negative


def test_word_boundaries_are_respected():
    caption = "Leftover contrast, rightward shift, uppermost lobe, enlarged heart, nodular bilateral change."
    for rule in RULES:
        assert apply_rule(caption, rule, rng()) is None, rule
    assert make_hard_negatives(caption) == []


def test_no_applicable_rule_gives_empty_list():
    assert make_hard_negatives("See prior study.", num=5) == []
    assert make_hard_negatives("", num=3) == []


def test_make_hard_negatives_realistic_example():
    caption = "Small nodule in the left upper zone."
    negatives = make_hard_negatives(caption, num=10, seed=0)
    # all four single-rule edits (and a finding swap) are there, plus compositions to fill up
    for expected in [
        "Small nodule in the right upper zone.",
        "Small nodule in the left lower zone.",
        "Large nodule in the left upper zone.",
        "No nodule in the left upper zone.",
    ]:
        assert expected in negatives
    assert len(negatives) == 10


RANDOM_WORDS = (
    "Left Right left right upper lower apical basal small large mild severe moderate there is are no not seen "
    "without with nodule nodules mass masses effusion pneumothorax opacity opacities in the of a lobe zone base "
    "heart normal leftover rightward and , ."
).split()


def random_captions(count: int) -> list[str]:
    generator = random.Random(1234)
    return [" ".join(generator.choices(RANDOM_WORDS, k=generator.randint(1, 12))) for _ in range(count)]


def test_deterministic_never_positive_distinct_and_bounded():
    realistic = [
        "Small nodule in the left upper zone.",
        "There is a small right pleural effusion.",
        "No pneumothorax.",
        "Mild cardiomegaly. No focal consolidation.",
        "Moderate left basal atelectasis without effusion.",
    ]
    for caption in realistic + random_captions(50):
        for num in (0, 1, 3, 6):
            first = make_hard_negatives(caption, num=num, seed=7)
            assert first == make_hard_negatives(caption, num=num, seed=7)
            assert len(first) <= num
            normalised = [normalise(n) for n in first]
            assert normalise(caption) not in normalised
            assert len(set(normalised)) == len(normalised)
            # a smaller num is a prefix of a larger one
            assert first == make_hard_negatives(caption, num=6, seed=7)[:num]


def test_seed_changes_the_rule_order():
    caption = "Small nodule in the left upper zone."
    firsts = {make_hard_negatives(caption, num=1, seed=seed)[0] for seed in range(30)}
    assert len(firsts) > 1


def test_independent_of_hash_randomisation():
    code = "from regionmed_clip.data.negatives import make_hard_negatives as m; print(m('Small left nodule.', 4, 5))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hashseed, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        ).stdout
        for hashseed in ("1", "2")
    }
    assert outputs == {str(make_hard_negatives("Small left nodule.", 4, 5)) + "\n"}


def test_fewer_than_num_when_few_rules_apply():
    negatives = make_hard_negatives("No pneumothorax.", num=10, vocabulary=())
    assert negatives == ["Pneumothorax."]


def test_default_vocabulary_and_rules():
    assert RULES == ("laterality", "location", "negation", "severity", "finding")
    assert {"nodule", "mass", "effusion", "pneumothorax"} <= set(FINDINGS)


def test_bad_input():
    with pytest.raises(TypeError, match="caption"):
        make_hard_negatives(None)
    with pytest.raises(TypeError, match="caption"):
        apply_rule(b"left", "laterality", rng())
    with pytest.raises(ValueError, match="num"):
        make_hard_negatives("Left nodule.", num=-1)
    with pytest.raises(ValueError, match="rule"):
        apply_rule("Left nodule.", "colour", rng())


# --- region captions: one edit per rule, plus distinct finding swaps ------------------------------

_LESIONS = ("nodule", "cavity", "mass", "consolidation", "effusion", "calcification")


def _swapped_findings(negatives: tuple[str, ...]) -> set[str]:
    """The finding named by each negative that keeps "small ... in the left upper zone" but changes the finding."""
    pattern = re.compile(r"small (\w+) in the left upper zone")
    return {m.group(1) for m in map(pattern.fullmatch, negatives) if m and m.group(1) != "nodule"}


def test_region_hard_negatives_edit_one_attribute_each():
    negatives = region_hard_negatives("small nodule in the left upper zone", 0, _LESIONS)
    assert negatives[:4] == ("small nodule in the right upper zone", "small nodule in the left lower zone",
                             "no nodule in the left upper zone", "large nodule in the left upper zone")
    assert len(_swapped_findings(negatives)) == 5  # the default: five distinct finding swaps, all here
    assert len(set(negatives)) == len(negatives)


def test_region_hard_negatives_can_swap_to_every_other_finding():
    caption = "small nodule in the left upper zone"
    every = region_hard_negatives(caption, 0, _LESIONS, finding_swaps=len(_LESIONS) - 1)
    assert _swapped_findings(every) == set(_LESIONS) - {"nodule"}  # the look-alike "cavity" included
    # asking for more swaps than the vocabulary has stops at the vocabulary
    assert region_hard_negatives(caption, 0, _LESIONS, finding_swaps=50) == every
    # deterministic, and the seed changes which two swaps are drawn, not how many
    two = region_hard_negatives(caption, 3, _LESIONS, finding_swaps=2)
    assert two == region_hard_negatives(caption, 3, _LESIONS, finding_swaps=2)
    assert len(_swapped_findings(two)) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_region_hard_negatives_reject_a_bad_swap_count(bad):
    with pytest.raises(ValueError, match="finding_swaps"):
        region_hard_negatives("small nodule in the left upper zone", 0, _LESIONS, finding_swaps=bad)
