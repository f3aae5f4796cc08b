"""Metrics of the RSNA 2019 challenge and of the node's operating points.

All functions take numpy arrays in label order :data:`LABELS` and return
plain Python numbers / dicts (JSON-ready).  ``nan`` marks a value that is
undefined on the data (e.g. an AUC when a label has only one class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ichnode.config import LABELS
from ichnode.model import aggregate_series

LABEL_WEIGHTS = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
EPSILON = 1e-15  # the clipping of sklearn's log_loss, as the competition used


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.shape[1] != len(LABELS):
        raise ValueError(
            f"y_true and y_prob must both have shape (N, {len(LABELS)}), "
            f"got {y_true.shape} and {y_prob.shape}"
        )
    return y_true, y_prob


def sample_log_loss(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    weights: Sequence[float] = LABEL_WEIGHTS,
    eps: float = EPSILON,
) -> np.ndarray:
    """Each sample's weighted mean over the six labels of the binary log loss
    (weight 2 for ``any``, 1 per subtype); probabilities clipped to ``[eps, 1 - eps]``."""
    y_true, y_prob = _check(y_true, y_prob)
    weights = np.asarray(weights, dtype=np.float64)
    p = np.clip(y_prob, eps, 1.0 - eps)
    loss = -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))
    return (loss * weights).sum(axis=1) / weights.sum()


def weighted_log_loss(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    weights: Sequence[float] = LABEL_WEIGHTS,
    eps: float = EPSILON,
) -> float:
    """The competition metric: weighted multi-label log loss, the mean over
    samples of :func:`sample_log_loss`."""
    per_sample = sample_log_loss(y_true, y_prob, weights, eps)
    return float(per_sample.mean()) if len(per_sample) else math.nan


def per_label_log_loss(y_true: np.ndarray, y_prob: np.ndarray, eps: float = EPSILON) -> dict:
    """Mean binary log loss of each label."""
    y_true, y_prob = _check(y_true, y_prob)
    p = np.clip(y_prob, eps, 1.0 - eps)
    loss = -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))
    return {label: float(loss[:, i].mean()) for i, label in enumerate(LABELS)}


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """ROC AUC per label (sklearn); ``nan`` where a label has a single class."""
    from sklearn.metrics import roc_auc_score

    y_true, y_prob = _check(y_true, y_prob)
    out = {}
    for i, label in enumerate(LABELS):
        column = y_true[:, i]
        if column.min() == column.max():
            out[label] = math.nan
        else:
            out[label] = float(roc_auc_score(column, y_prob[:, i]))
    return out


def bootstrap_auc_interval(
    y_true: np.ndarray, y_prob: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each label's ROC AUC, resampling rows
    (series, for series-level inputs) with replacement; ``nan`` where a
    label has a single class."""
    from sklearn.metrics import roc_auc_score

    y_true, y_prob = _check(y_true, y_prob)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y_true), len(y_true)) for _ in range(resamples)]
    tail = 100 * (1 - level) / 2
    out = {}
    for i, label in enumerate(LABELS):
        column, scores = y_true[:, i], y_prob[:, i]
        aucs = [roc_auc_score(column[d], scores[d]) for d in draws if column[d].min() != column[d].max()]
        out[label] = (
            (float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))) if aucs else (math.nan, math.nan)
        )
    return out


def sensitivity_specificity(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Per label: sensitivity, specificity and counts at ``prob >= threshold``."""
    y_true, y_prob = _check(y_true, y_prob)
    out = {}
    for i, label in enumerate(LABELS):
        truth = y_true[:, i] > 0.5
        called = y_prob[:, i] >= thresholds[label]
        tp = int(np.sum(truth & called))
        fn = int(np.sum(truth & ~called))
        tn = int(np.sum(~truth & ~called))
        fp = int(np.sum(~truth & called))
        out[label] = {
            "threshold": float(thresholds[label]),
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan,
            "tp": tp,
            "fn": fn,
            "tn": tn,
            "fp": fp,
        }
    return out


def series_level(
    series_ids: Sequence[str], y_true: np.ndarray, y_prob: np.ndarray, aggregation: str = "max"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Aggregate slice rows to series: label = max over slices, score per ``aggregation``.

    Returns ``(series, y_true (S, 6), y_prob (S, 6))`` with series in first-seen order.
    """
    y_true, y_prob = _check(y_true, y_prob)
    ids = np.asarray(series_ids)
    if len(ids) != len(y_true):
        raise ValueError(f"series_ids has {len(ids)} entries, y_true has {len(y_true)} rows")
    order, first = np.unique(ids, return_index=True)
    order = order[np.argsort(first)]
    truth = np.zeros((len(order), len(LABELS)))
    probs = np.zeros((len(order), len(LABELS)))
    for j, sid in enumerate(order):
        rows = ids == sid
        truth[j] = y_true[rows].max(axis=0)
        probs[j] = aggregate_series(y_prob[rows], aggregation)
    return [str(s) for s in order], truth, probs


def _below(score: float, scores: np.ndarray) -> float:
    """A threshold flagging the same ``scores`` as ``score`` (``>=``), halfway down
    to the next lower one (to 0 when none is lower).  A threshold equal to a
    score would put that series on a knife edge: the node's score of it differs
    in the last bits (float16 training cache, batch size, backend)."""
    lower = scores[scores < score]
    return float((score + (lower.max() if len(lower) else 0.0)) / 2)


def threshold_at_sensitivity(y_true: np.ndarray, y_score: np.ndarray, sensitivity: float) -> float:
    """A threshold of the highest operating point whose sensitivity (``score >= t``)
    is at least ``sensitivity``, halfway between the lowest positive score it
    flags and the next lower score."""
    truth = np.asarray(y_true) > 0.5
    scores = np.asarray(y_score, dtype=np.float64)
    positives = np.sort(scores[truth])[::-1]
    if len(positives) == 0:
        return 0.5
    k = max(1, math.ceil(sensitivity * len(positives)))
    return _below(positives[k - 1], scores)


def threshold_youden(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """A threshold of the operating point maximising sensitivity + specificity - 1
    (Youden's J), halfway between the lowest score it flags and the next lower one."""
    from sklearn.metrics import roc_curve

    truth = np.asarray(y_true) > 0.5
    if truth.all() or not truth.any():
        return 0.5
    scores = np.asarray(y_score, dtype=np.float64)
    fpr, tpr, thr = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return _below(min(1.0, thr[best]), scores)


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, any_sensitivity: float = 0.95, subtypes: str = "youden"
) -> dict[str, float]:
    """Operating thresholds: ``any`` at ``any_sensitivity``; subtypes by Youden or the same sensitivity."""
    y_true, y_prob = _check(y_true, y_prob)
    out = {"any": threshold_at_sensitivity(y_true[:, 0], y_prob[:, 0], any_sensitivity)}
    for i, label in enumerate(LABELS[1:], start=1):
        if subtypes == "youden":
            out[label] = threshold_youden(y_true[:, i], y_prob[:, i])
        else:
            out[label] = threshold_at_sensitivity(y_true[:, i], y_prob[:, i], any_sensitivity)
    return out


def threshold_fallbacks(y_true: np.ndarray, subtypes: str = "youden") -> list[str]:
    """The labels whose :func:`choose_thresholds` value is the placeholder 0.5,
    not chosen by the rule: no positive rows (Youden: or no negative rows)."""
    truth = np.asarray(y_true) > 0.5
    out = []
    for i, label in enumerate(LABELS):
        youden = i > 0 and subtypes == "youden"
        if not truth[:, i].any() or (youden and truth[:, i].all()):
            out.append(label)
    return out


def report(
    series_ids: Sequence[str],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Mapping[str, float],
    aggregation: str = "max",
) -> dict:
    """All metrics, slice and series level, as one JSON-ready dict."""
    _, s_true, s_prob = series_level(series_ids, y_true, y_prob, aggregation)
    return {
        "n_slices": len(y_true),
        "n_series": len(s_true),
        "positives_slice": {l: int(v) for l, v in zip(LABELS, np.asarray(y_true).sum(axis=0))},
        "positives_series": {l: int(v) for l, v in zip(LABELS, s_true.sum(axis=0))},
        "weighted_log_loss": weighted_log_loss(y_true, y_prob),
        "log_loss": per_label_log_loss(y_true, y_prob),
        "slice_auc": roc_auc(y_true, y_prob),
        "series_auc": roc_auc(s_true, s_prob),
        "series_auc_ci95": bootstrap_auc_interval(s_true, s_prob),
        "slice_sens_spec": sensitivity_specificity(y_true, y_prob, thresholds),
        "series_sens_spec": sensitivity_specificity(s_true, s_prob, thresholds),
        "thresholds": {l: float(thresholds[l]) for l in LABELS},
        "series_aggregation": aggregation,
    }
