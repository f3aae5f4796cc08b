"""Evaluate a model on data in the RSNA layout, through the node's own path.

Usage::

    python -m training.evaluate --model PATH|default --data DIR [--data DIR2 ...] --out REPORT.json \
        [--image-dir stage_2_test] [--submission SUB.csv] [--predictions SLICES.csv] [--workers N] [--batch-size 32]

Each series is read, ordered and preprocessed by
``ichnode.imaging.preprocess_series`` with the card's windows, size and
context, and scored by ``ichnode.model.HemorrhageModel.predict_series``:
exactly what the node runs.  Series are decoded in parallel worker processes
(a bounded queue ahead of the model).

Several ``--data`` folders are pooled into one report (a single 300-series
phantom set moves a subtype's series AUC by up to 0.1).

``REPORT.json`` holds ``weighted_log_loss``, ``slice_auc`` and ``series_auc``
(label -> AUC), ``series_auc_ci95`` (label -> [low, high], bootstrap over
series), sensitivity/specificity at the card thresholds at slice and
series level, counts, throughput and the ``skipped`` files (``data`` folder,
``path`` relative to it, ``error``); a metric undefined on the data (the AUC
of a label with one class) is ``null``.  ``REPORT.roc.png`` the ROC curves.
The images are read from ``DIR/stage_2_train`` (labels from
``DIR/stage_2_train.csv``), or from ``DIR/stage_2_test`` when the folder has
no labels CSV but that folder (the Kaggle test layout); ``--image-dir``
names another.  ``--submission`` writes a Kaggle submission (``ID,Label``
with ``ID_<sop>_<label>``) with a row per label for every ``.dcm`` of the
image folder: an image that was not scored (left out of the index, or its
pixels could not be decoded) gets the mean of its series' scores, else the
mean of all scores (0.5 when none); the report counts them
(``submission_filled``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from ichnode import imaging
from ichnode.config import LABELS
from ichnode.model import HemorrhageModel, ModelCard, load_model
from training import metrics as M
from training import rsna

logger = logging.getLogger(__name__)


def _load_series(job: tuple[list[str], tuple, tuple, int]) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    """Preprocess one series; returns (volume, positions of the used files in z order, failures)."""
    import pydicom

    rsna._quiet_pydicom()
    paths, windows, size, context = job
    datasets, kept, failures = [], [], []
    for i, path in enumerate(paths):
        try:
            datasets.append(pydicom.dcmread(path))
            kept.append(i)
        except Exception as exc:  # noqa: BLE001 - reported, slice skipped
            failures.append((i, f"{type(exc).__name__}: {exc}"))
    try:
        volume, order = imaging.preprocess_series(datasets, windows, size, context) if datasets else (None, [])
    except Exception:  # noqa: BLE001 - find the slices that cannot be decoded, then retry without them
        good = []
        for ds, i in zip(datasets, kept):
            try:
                imaging.to_hu(ds)
                good.append((ds, i))
            except Exception as exc:  # noqa: BLE001
                failures.append((i, f"{type(exc).__name__}: {exc}"))
        datasets, kept = [g[0] for g in good], [g[1] for g in good]
        volume, order = imaging.preprocess_series(datasets, windows, size, context) if datasets else (None, [])
    return volume, [kept[i] for i in order], failures


def _bounded_map(fn: Any, jobs: list, workers: int, ahead: int) -> Iterator[Any]:
    """Ordered results of ``fn`` over ``jobs``, at most ``ahead`` pending (bounded memory)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with rsna._executor(workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(fn, job))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for job in it:
                pending.append(pool.submit(fn, job))
                break
            yield result


def series_volumes(
    index: pd.DataFrame, data_dir: Path, series: Sequence[np.ndarray], card: ModelCard, workers: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]]:
    """Each series' model input as the node makes it: its index ``rows`` (z order)
    read from the DICOM files by ``ichnode.imaging.preprocess_series`` with the
    card's windows, size and context, float32, decoded in ``workers`` processes.
    Yields ``(rows in the volume, volume or None, [(row, error)] of the files left out)``."""
    preprocessing = (card.windows, card.input_size, card.context_slices)
    jobs = [([os.path.join(data_dir, index["path"].iat[r]) for r in rows], *preprocessing) for rows in series]
    for rows, (volume, used, failures) in zip(series, _bounded_map(_load_series, jobs, workers, 2 * workers)):
        yield rows[used], volume, [(int(rows[i]), error) for i, error in failures]


def predict_dataset(
    model: HemorrhageModel,
    index: pd.DataFrame,
    data_dir: Path,
    *,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
) -> tuple[np.ndarray, list[dict[str, str]], dict[str, float]]:
    """Probabilities ``(N, 6)`` for every index row (``nan`` for skipped rows),
    the skipped files (paths relative to ``data_dir``), and the seconds spent:
    ``wall_s`` in all, ``model_s`` in the model."""
    from tqdm import tqdm

    probs = np.full((len(index), len(LABELS)), np.nan, dtype=np.float32)
    skipped: list[dict[str, str]] = []
    series = [rows for _, rows in rsna.iter_series(index)]
    t_model = 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(index), desc="evaluate", unit="slice", disable=not progress)
    for rows, volume, failures in series_volumes(index, data_dir, series, model.card, workers):
        skipped += [{"path": index["path"].iat[row], "error": error} for row, error in failures]
        if volume is not None:
            t0 = time.perf_counter()
            probs[rows] = model.predict_series(volume, batch_size=batch_size)
            t_model += time.perf_counter() - t0
        bar.update(len(rows) + len(failures))
    bar.close()
    return probs, skipped, {"wall_s": time.perf_counter() - started, "model_s": t_model}


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """ROC curves, slice and series level, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 5.5))
    axes = np.atleast_1d(axes)
    for ax, (level, (y_true, y_prob)) in zip(axes, curves.items()):
        for i, label in enumerate(LABELS):
            truth = y_true[:, i] > 0.5
            if truth.all() or not truth.any():
                continue
            fpr, tpr, _ = roc_curve(truth, y_prob[:, i])
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(truth, y_prob[:, i]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{level} level", xlim=(0, 1), ylim=(0, 1.01))
        if ax.get_legend_handles_labels()[0]:  # none where every label has one class
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_dir_for(folder: Path) -> str:
    """``stage_2_train``, or ``stage_2_test`` where the folder has that and no labels CSV."""
    if not (folder / rsna.TRAIN_CSV).exists() and (folder / rsna.TEST_DIR).is_dir():
        return rsna.TEST_DIR
    return rsna.TRAIN_DIR


def write_submission(path: Path, index: pd.DataFrame, probs: np.ndarray, image_ids: Sequence[str]) -> int:
    """Kaggle format: ``ID,Label`` rows ``ID_<sop>_<label>,<probability>``, six for
    every image of ``image_ids`` (Kaggle rejects a file that lacks one).

    An image without a score gets the mean score of its series when the rest
    of the series was scored, else the mean of all scores (0.5 when there are
    none).  Returns how many images were filled so.
    """
    probs = np.array(probs, dtype=np.float64)
    scored = np.isfinite(probs).all(axis=1)
    overall = probs[scored].mean(axis=0) if scored.any() else np.full(len(LABELS), 0.5)
    series = index["series_key" if "series_key" in index.columns else "series_uid"].to_numpy()
    means = pd.DataFrame(probs[scored]).groupby(series[scored]).mean()
    for row in np.flatnonzero(~scored):
        probs[row] = means.loc[series[row]].to_numpy() if series[row] in means.index else overall
    known = dict(zip(index["image_id"].to_numpy()[::-1], probs[::-1]))  # the first of an ID listed twice
    have = set(index["image_id"].to_numpy()[scored])
    ids = list(dict.fromkeys(image_ids))
    p = np.array([known.get(i, overall) for i in ids]).reshape(-1, len(LABELS))
    frame = pd.DataFrame({"ID": [f"{i}_{label}" for i in ids for label in LABELS], "Label": p.reshape(-1)})
    frame.to_csv(path, index=False, float_format="%.6f")
    filled = sum(i not in have for i in ids)
    if filled:
        logger.warning("submission: %d of %d images had no score; filled with their series' mean, else the mean "
                       "of all scores", filled, len(ids))
    return filled


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate(
    model: HemorrhageModel,
    data_dir: Path | Sequence[Path],
    out: Path,
    *,
    submission: Path | None = None,
    predictions: Path | None = None,
    cache_dir: Path | None = None,
    image_dir: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every slice of ``data_dir`` (one folder, or several pooled into one
    report); write ``out`` (JSON), the ROC plot and the submission.  Images are
    read from each folder's ``image_dir`` (None: :func:`image_dir_for`); labels
    only with ``stage_2_train``."""
    folders = [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]
    if cache_dir is not None and len(folders) > 1:
        raise ValueError("cache_dir names one folder's header index; give it for a single data folder only")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or rsna.default_workers()
    parts, all_probs, skipped, image_ids = [], [], [], []
    timing = {"wall_s": 0.0, "model_s": 0.0}
    for number, folder in enumerate(folders):
        folder_cache = cache_dir or rsna.default_cache_dir(folder)
        images = image_dir or image_dir_for(folder)
        index = rsna.build_index(
            folder, folder_cache, image_dir=images, labels_csv=rsna.TRAIN_CSV if images == rsna.TRAIN_DIR else None,
            workers=workers, progress=progress,
        )
        image_ids += sorted(p.stem for p in (folder / images).iterdir() if p.suffix.lower() == ".dcm")
        probs, folder_skipped, folder_timing = predict_dataset(
            model, index, folder, batch_size=batch_size, workers=workers, progress=progress
        )
        # Series are told apart by folder too: two data sets may reuse a UID.
        index = index.assign(data=str(folder), series_key=f"{number}/" + index["series_uid"])
        parts.append(index)
        all_probs.append(probs)
        # What the index left out is part of the report, not only of a log; paths are
        # relative to their folder, which pooled folders may share.
        skipped += [{"data": str(folder), **entry} for entry in rsna.index_skipped(folder_cache) + folder_skipped]
        for key in timing:
            timing[key] += folder_timing[key]
    index = pd.concat(parts, ignore_index=True)
    probs = np.concatenate(all_probs)
    n = int(np.isfinite(probs[:, 0]).sum())
    timing["slices_per_s_end_to_end"] = n / timing["wall_s"] if timing["wall_s"] else math.nan
    timing["slices_per_s_model"] = n / timing["model_s"] if timing["model_s"] else math.nan
    card = model.card
    result: dict[str, Any] = {
        # The file's hash and the patients: training.export --heldout checks the
        # report is of the model it installs and on none of its run's patients.
        "model": {"name": card.name, "version": card.version, "path": str(model.path),
                  "sha256": file_sha256(Path(model.path))},
        "data": str(folders[0]) if len(folders) == 1 else [str(f) for f in folders],
        "patients_sha256": rsna.patient_digests(index["patient_id"]),
        "skipped": skipped,
        "timing": timing,
    }
    if all(rsna.has_labels(part) for part in parts):
        keep = np.isfinite(probs).all(axis=1)
        y_true = rsna.label_matrix(index)[keep]
        y_prob = probs[keep]
        series_ids = index["series_key"].to_numpy()[keep]
        result.update(M.report(series_ids, y_true, y_prob, card.thresholds, card.series_aggregation))
        _, s_true, s_prob = M.series_level(series_ids, y_true, y_prob, card.series_aggregation)
        roc_path = out.with_suffix(".roc.png")
        plot_roc(roc_path, {"slice": (y_true, y_prob), "series": (s_true, s_prob)},
                 f"{card.name} {card.version} on {', '.join(f.name for f in folders)}")
        result["roc_plot"] = str(roc_path)
    else:
        logger.info("%s has no labels: writing predictions only", ", ".join(map(str, folders)))
    if submission is not None:
        result["submission_filled"] = write_submission(submission, index, probs, image_ids)
        result["submission"] = str(submission)
    if predictions is not None:
        columns = ["data", "image_id", "patient_id", "series_uid", "slice_index"]
        table = index[columns + [c for c in LABELS if c in index.columns]].copy()
        for j, label in enumerate(LABELS):
            table[f"p_{label}"] = probs[:, j]
        table.to_csv(predictions, index=False, float_format="%.6f")
        result["predictions"] = str(predictions)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_strict_json(result), indent=2, allow_nan=False) + "\n")
    return result


def _strict_json(value: Any) -> Any:
    """``value`` for standard JSON: an undefined metric (nan) is null, as in the
    model card; strict readers (JavaScript, many dashboards) refuse ``NaN``."""
    if isinstance(value, dict):
        return {key: _strict_json(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@click.command()
@click.option("--model", "model_arg", default="default", show_default=True,
              help="Path to a .keras model (card beside it), or 'default' for the bundled one.")
@click.option("--data", "data_dirs", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data folder in the RSNA layout (stage_2_train.csv optional); repeat to pool several.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Report JSON.")
@click.option("--image-dir", default=None,
              help="Image folder inside each DIR [default: stage_2_train, or stage_2_test in a folder "
                   "with that and no stage_2_train.csv].")
@click.option("--submission", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a Kaggle submission CSV here: six rows for every .dcm of the image folder.")
@click.option("--predictions", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every slice's probabilities (and labels) to this CSV.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the header index is cached (default DIR/.ichnode-cache; one --data only).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=None, type=click.IntRange(1), help="Decoding processes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(model_arg: str, data_dirs: tuple[Path, ...], out: Path, image_dir: str | None, submission: Path | None,
         predictions: Path | None, cache_dir: Path | None,
         batch_size: int, workers: int | None, quiet: bool) -> None:
    """Evaluate a model on RSNA-layout data folders."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = load_model(None if model_arg == "default" else Path(model_arg))
    if cache_dir is not None and len(data_dirs) > 1:
        raise click.BadParameter("give --cache-dir with a single --data folder", param_hint="--cache-dir")
    try:
        result = evaluate(model, list(data_dirs), out, submission=submission, predictions=predictions,
                          cache_dir=cache_dir, image_dir=image_dir, batch_size=batch_size, workers=workers,
                          progress=not quiet)
    except rsna.DataError as exc:
        raise click.ClickException(str(exc)) from exc
    if "series_auc" in result:
        click.echo(f"weighted log loss {result['weighted_log_loss']:.4f}")
        for label in LABELS:
            low, high = result["series_auc_ci95"][label]
            click.echo(
                f"{label:>17}: slice AUC {result['slice_auc'][label]:.4f}  series AUC "
                f"{result['series_auc'][label]:.4f} (95 % interval {low:.3f}-{high:.3f})"
            )
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
