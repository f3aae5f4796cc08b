"""Export a trained model with its model card, and install it where the node looks.

:func:`make_card` and :func:`save` are called by ``training.train`` at the
end of a run (thresholds chosen on the validation split).  The command line
copies a run's export into a model folder, e.g. the bundled default::

    python -m training.export --run RUNDIR --out ichnode/models --name ich-phantom-default

Every export is reloaded with ``ichnode.model.load_model`` so a model that
the node would refuse is never written silently.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import click
import pandas as pd

from ichnode.config import LABELS
from ichnode.model import (
    CARD_SUFFIX,
    HemorrhageModel,
    ModelCard,
    card_path_for,
    load_model,
)


def make_card(
    config: Any,
    *,
    thresholds: dict[str, float],
    metrics: dict[str, Any],
    command: str,
    sequence_stage: bool,
) -> ModelCard:
    """The card of a model trained with ``config`` (a ``training.train.TrainConfig``)."""
    import keras

    exp = config.export
    return ModelCard(
        name=exp.name,
        version=exp.version,
        labels=LABELS,
        input_size=config.input.size,
        windows=config.input.windows,
        context_slices=config.input.context_slices,
        channels=config.channels,
        sequence_stage=sequence_stage,
        series_aggregation=exp.series_aggregation,
        test_time_flip=exp.test_time_flip,
        thresholds=thresholds,
        trained_on=exp.trained_on,
        intended_use=exp.intended_use,
        disclaimer=exp.disclaimer,
        command=command,
        seed=config.seed,
        metrics=metrics,
        architecture={"config": config.arch.get_config(), "training": config.model_dump(
            mode="json", include={"slice_stage", "sequence_stage", "data"})},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        keras_version=keras.__version__,
    )


def save(keras_model: Any, card: ModelCard, out_dir: Path, name: str) -> Path:
    """Write ``out_dir/name.keras`` and ``name.card.json``; reload both as the node does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.keras"
    keras_model.save(path)
    card.to_json(card_path_for(path))
    load_model(path)  # raises if the node would refuse it
    return path


def install(model_path: Path, out_dir: Path, name: str | None = None, card_updates: dict | None = None) -> HemorrhageModel:
    """Copy a model and its card into ``out_dir`` (optionally renamed), then verify it loads."""
    model_path = Path(model_path)
    card = ModelCard.from_json(card_path_for(model_path))
    if card_updates:
        card = ModelCard.model_validate({**card.model_dump(mode="json"), **card_updates})
    name = name or model_path.name.removesuffix(".keras")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.keras"
    if target.resolve() != model_path.resolve():
        shutil.copyfile(model_path, target)
    card.to_json(card_path_for(target))
    return load_model(target)


def heldout_metrics(report_path: Path, model_path: Path | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """The headline numbers of a ``training.evaluate`` report, for a card.

    The card states them as the accuracy of the model at ``model_path`` on data
    its run never saw: a report of another model, or one on patients of
    ``run_dir``'s training or validation split, is refused."""
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    keys = ("data", "n_series", "n_slices", "positives_series", "weighted_log_loss", "slice_auc", "series_auc")
    missing = [k for k in keys if k not in report]
    if missing:
        raise click.ClickException(f"{report_path} lacks {missing}: not a labelled evaluation report")
    if model_path is not None:
        _check_report_model(report, report_path, Path(model_path))
    if run_dir is not None:
        _check_report_heldout(report, report_path, Path(run_dir))
    out = {k: report[k] for k in keys}
    if "series_auc_ci95" in report:
        out["series_auc_ci95"] = report["series_auc_ci95"]
    out["series_sens_spec"] = {
        label: {k: v[k] for k in ("threshold", "sensitivity", "specificity")}
        for label, v in report["series_sens_spec"].items()
    }
    return out


def _check_report_model(report: dict[str, Any], report_path: Path, model_path: Path) -> None:
    from training.evaluate import file_sha256

    of = report.get("model") or {}
    if "sha256" in of:
        same = of["sha256"] == file_sha256(model_path)
    else:  # a report without the model's hash: its name, version and thresholds must all be the card's
        card = ModelCard.from_json(card_path_for(model_path))
        thresholds = {label: v.get("threshold") for label, v in report.get("series_sens_spec", {}).items()}
        same = (of.get("name"), of.get("version")) == (card.name, card.version) and all(
            thresholds.get(label) == card.thresholds[label] for label in LABELS
        )
    if not same:
        raise click.ClickException(
            f"{report_path} is a report of model {of.get('name')} {of.get('version')} ({of.get('path')}), "
            f"not of {model_path}: evaluate this model on held-out data"
        )


def _check_report_heldout(report: dict[str, Any], report_path: Path, run_dir: Path) -> None:
    from training import rsna

    split_csv = run_dir / "split.csv"
    if "patients_sha256" not in report:
        raise click.ClickException(
            f"{report_path} does not record its patients, so it cannot be told apart from a report on the run's "
            "own training or validation patients: run training.evaluate again"
        )
    if not split_csv.exists():
        raise click.ClickException(f"{split_csv} is missing: cannot check that {report_path} is on held-out patients")
    ran_on = set(rsna.patient_digests(pd.read_csv(split_csv, dtype=str, keep_default_na=False)["patient_id"]))
    overlap = ran_on & set(report["patients_sha256"])
    if overlap:
        raise click.ClickException(
            f"{report_path} is not held out: {len(overlap)} of its {len(report['patients_sha256'])} patients are in "
            f"{split_csv} (the run trained, or chose its checkpoints and thresholds, on them)"
        )


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finished training run folder (holds export/).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model folder, e.g. ichnode/models.")
@click.option("--name", default=None, help="File name stem (default: the card's name).")
@click.option("--heldout", "heldout_report", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A training.evaluate report of this model on held-out data (no patient of the "
              "run's split.csv), recorded in the card's metrics.")
def main(run_dir: Path, out: Path, name: str | None, heldout_report: Path | None) -> None:
    """Install the model exported by a training run into a model folder."""
    found = sorted((run_dir / "export").glob("*.keras"))
    if len(found) != 1:
        raise click.ClickException(f"{run_dir / 'export'} holds {len(found)} .keras files, expected 1")
    updates = None
    if heldout_report is not None:
        card = ModelCard.from_json(card_path_for(found[0]))
        updates = {"metrics": {**card.metrics, "heldout": heldout_metrics(heldout_report, found[0], run_dir)}}
    model = install(found[0], out, name, updates)
    size = Path(model.path).stat().st_size
    click.echo(f"installed {model.path} ({size / 1e6:.2f} MB) and its {CARD_SUFFIX}")


if __name__ == "__main__":
    main()
