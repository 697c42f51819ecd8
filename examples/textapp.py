"""A small real app: two versions of a sentiment model for short texts.

* :class:`SentimentV1` scores one text per call with a small word list.
* :class:`SentimentV2` knows more words and negation ("not good"), and is
  batch-capable: marked with ``@servecore.batch``, it receives a list of requests and
  returns a list of answers. Like a model on an accelerator, a call has a fixed cost
  whatever the batch size, so batching pays.

Each request is a dict ``{"text": "..."}``; each answer a dict with the label, the
score, the model version, and (for V2) the size of the batch it was served in::

    ctl.create_backend("sentiment-v1", "examples.textapp:SentimentV1", num_replicas=2)
    ctl.create_backend("sentiment-v2", "examples.textapp:SentimentV2",
                       max_batch_size=16, batch_wait_timeout_s=0.005)
"""

from __future__ import annotations

import re
import time
from typing import Any

from servecore import batch

__all__ = ["SAMPLE_TEXTS", "SentimentV1", "SentimentV2"]

_WORDS = re.compile(r"[a-z']+")

_POSITIVE_V1 = {"good", "great", "love", "excellent", "happy", "nice"}
_NEGATIVE_V1 = {"bad", "awful", "hate", "terrible", "sad", "poor"}

_POSITIVE_V2 = _POSITIVE_V1 | {"wonderful", "fast", "friendly", "delicious", "recommend"}
_NEGATIVE_V2 = _NEGATIVE_V1 | {"slow", "rude", "broken", "cold", "refund", "never"}
_NEGATIONS = {"not", "no", "hardly", "isn't", "wasn't", "don't", "didn't"}

#: Texts the demo sends.
SAMPLE_TEXTS = [
    "I love this place, the staff were friendly and the food was great",
    "terrible service and the soup was cold",
    "not good, not bad either",
    "would recommend to anyone, wonderful evening",
    "the delivery was slow and the box arrived broken",
    "it was nice",
    "I hate waiting, and we waited an hour",
    "excellent coffee, happy to come back",
    "the waiter was rude; I want a refund",
    "didn't love it, didn't hate it",
]


def _label(score: float, threshold: float) -> str:
    if score > threshold:
        return "positive"
    if score < -threshold:
        return "negative"
    return "neutral"


class SentimentV1:
    """Version 1: counts positive and negative words, one text per call.

    ``cost_s`` is the simulated compute time of one call.
    """

    def __init__(self, threshold: float = 0.0, cost_s: float = 0.001) -> None:
        self.threshold = threshold
        self.cost_s = cost_s

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.cost_s)
        words = _WORDS.findall(request["text"].lower())
        raw = sum(w in _POSITIVE_V1 for w in words) - sum(w in _NEGATIVE_V1 for w in words)
        score = raw / max(1, len(words)) * 5
        return {"label": _label(score, self.threshold), "score": round(score, 3), "model": "v1"}


@batch
class SentimentV2:
    """Version 2: a larger vocabulary, negation, and batches.

    A call costs ``cost_s`` plus ``cost_per_text_s`` per text: the fixed part is what
    batching saves.
    """

    def __init__(
        self, threshold: float = 0.05, cost_s: float = 0.002, cost_per_text_s: float = 0.0001
    ) -> None:
        self.threshold = threshold
        self.cost_s = cost_s
        self.cost_per_text_s = cost_per_text_s

    def _score(self, text: str) -> float:
        words = _WORDS.findall(text.lower())
        score = 0
        for i, word in enumerate(words):
            sign = -1 if i and words[i - 1] in _NEGATIONS else 1
            if word in _POSITIVE_V2:
                score += sign
            elif word in _NEGATIVE_V2:
                score -= sign
        return score / max(1, len(words)) * 5

    def __call__(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(self.cost_s + self.cost_per_text_s * len(requests))
        answers = []
        for request in requests:
            score = self._score(request["text"])
            answers.append(
                {
                    "label": _label(score, self.threshold),
                    "score": round(score, 3),
                    "model": "v2",
                    "batch": len(requests),
                }
            )
        return answers
