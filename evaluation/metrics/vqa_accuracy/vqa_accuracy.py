"""VQA accuracy: exact match of normalised answers, overall and per answer type (closed / open)."""

import datasets
import evaluate

from regionmed_clip.scoring import vqa_accuracy

_DESCRIPTION = """Exact-match accuracy after normalisation (lower case, punctuation and articles removed,
whitespace collapsed), as VQA-RAD and SLAKE results are reported: overall, and for closed (yes/no)
and open questions when answer types are given."""

_INPUTS = """
Args:
    predictions: predicted answer strings.
    references: reference answer strings.
    answer_types (optional list of "closed" / "open").
Returns:
    {"accuracy", "n"} and, with answer_types, {"closed_accuracy", "closed_n", "open_accuracy", "open_n"}.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["Yes", "the left lung"], references=["yes", "right lung"])
    {'accuracy': 0.5, 'n': 2}
"""


class VqaAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, answer_types=None):
        return vqa_accuracy(predictions, references, answer_types)
