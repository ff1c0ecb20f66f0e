"""BLEU-4 and ROUGE-L of generated answers against references, over characters for Chinese and words otherwise.

An ``evaluate`` module (``evaluate.load`` of this folder; ``dualadam_hf.generation_metric()`` does it), so
it works offline and on anyone's predictions. Self-contained: ``evaluate`` copies this file and imports it
alone.

Units: a text with any CJK character is split into its non-space characters (Chinese has no spaces between
words, and character-level scores are the custom for it); any other text into whitespace-separated words.

BLEU-4 (Papineni et al. 2002) over the corpus: clipped n-gram precisions p_1..p_4 summed over all
predictions, their geometric mean, times the brevity penalty min(1, exp(1 - r/c)) (r, c: total reference
and prediction lengths). Smoothing: add-one on the counts of n = 2..4 (Lin and Och 2004, "BLEU+1"), so a
corpus without a matching 4-gram is not scored 0 for that alone; unigrams are not smoothed, so answers with
no token in common with their references score 0.

ROUGE-L (Lin 2004): for each pair, the longest common subsequence L, recall L/|reference|, precision
L/|prediction|, F1 = 2PR/(P+R); averaged over pairs. Two empty texts score 1, one empty text 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import datasets
import evaluate

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def units(text: str) -> list[str]:
    if _CJK.search(text):
        return [character for character in text if not character.isspace()]
    return text.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(predictions: list[list[str]], references: list[list[str]]) -> float:
    matches, totals = [0] * 4, [0] * 4
    prediction_length = sum(len(tokens) for tokens in predictions)
    reference_length = sum(len(tokens) for tokens in references)
    for prediction, reference in zip(predictions, references):
        for n in range(1, 5):
            counts, reference_counts = _ngrams(prediction, n), _ngrams(reference, n)
            matches[n - 1] += sum(min(count, reference_counts[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(prediction) - n + 1, 0)
    if prediction_length == 0 or matches[0] == 0:
        return 0.0
    log_precision = math.log(matches[0] / totals[0])
    for n in range(1, 4):
        log_precision += math.log((matches[n] + 1) / (totals[n] + 1))
    brevity = min(0.0, 1.0 - reference_length / prediction_length)
    return math.exp(brevity + log_precision / 4)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    if not prediction and not reference:
        return 1.0
    common = _lcs(prediction, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


class GenerationMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Papineni et al. 2002 (BLEU); Lin and Och 2004 (BLEU+1 smoothing); Lin 2004 (ROUGE)",
            inputs_description="predictions: list of generated texts; references: list of reference texts, one each",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        prediction_units = [units(text) for text in predictions]
        reference_units = [units(text) for text in references]
        scores = [rouge_l(p, r) for p, r in zip(prediction_units, reference_units)]
        return {
            "bleu": bleu4(prediction_units, reference_units),
            "rouge_l": sum(scores) / len(scores) if scores else 0.0,
        }
