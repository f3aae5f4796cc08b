"""Train the two-stage hemorrhage model on data in the RSNA layout.

Usage::

    python -m training.train --data DIR --config CFG.yaml --out RUNDIR

Stages, each skipped when its output is already in ``RUNDIR`` (so running the
same command again resumes an interrupted run; inside a stage Keras'
``BackupAndRestore`` resumes from the last finished epoch).  The settings
that shape each stage's model are recorded when it starts
(``stage_settings.json``); a run resumed with other values is refused, naming
them, since the kept models would be described by the new ones in the card:

1. index, patient split, preprocessed slice cache (:mod:`training.rsna`);
2. slice stage: the 2.5D CNN + slice head on single slices
   (``slice_model.keras``);
3. embeddings of every usable slice (``embeddings.npz``; computed anew when
   the index it was computed on changed);
4. sequence stage over the slice embeddings of each series
   (``sequence_head.keras``);
5. export: the assembled model with thresholds chosen on the validation split
   and its card (``RUNDIR/export/NAME.keras`` + ``NAME.card.json``).

Curves go to ``history_<stage>.csv`` (CSVLogger) and ``history.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ichnode.config import LABELS
from ichnode.imaging import DEFAULT_WINDOWS
from training import metrics as M
from training import rsna

# Keras (training.models) is imported inside functions: the decoding worker
# processes (spawned) import this module and must stay light.

logger = logging.getLogger(__name__)

STAGE_SETTINGS = "stage_settings.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    split: dict[str, float] = {"train": 0.85, "val": 0.15}
    cache: bool = True  # preprocess every slice once into an on-disk memory map
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_dir: Path | None = None  # None: RUNDIR/cache
    workers: int | None = Field(None, ge=1)
    # A previous run's split.csv: its patients keep their split (so a fine-tuned
    # model is validated on the same patients); new patients are split by `split`.
    split_from: Path | None = None

    @field_validator("split")
    @classmethod
    def _split(cls, value: dict[str, float]) -> dict[str, float]:
        if "train" not in value or "val" not in value:
            raise ValueError(f"split must name 'train' and 'val', got {sorted(value)}")
        return value


class InputSection(_Section):
    size: tuple[int, int] = (128, 128)
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    context_slices: int = Field(1, ge=0)


class SliceStage(_Section):
    epochs: int = Field(6, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the training slices
    validation_steps: int | None = Field(None, ge=1)  # None: all validation slices
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    oversample: float = Field(0.0, ge=0, lt=1)  # fraction of samples drawn from subtype-positive slices
    init_from: Path | None = None  # a slice model (.keras, e.g. RUNDIR/slice_model.keras) to fine-tune from
    # Fraction of samples drawn from the hardest `hard_pool` of the training
    # slices, ranked by init_from's loss on them (needs init_from).
    hard_examples: float = Field(0.0, ge=0, lt=1)
    hard_pool: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _hard_needs_start(self) -> SliceStage:
        if self.hard_examples > 0 and self.init_from is None:
            raise ValueError("hard_examples needs init_from: the hard slices are ranked by that model's loss")
        if self.oversample + self.hard_examples >= 1:
            raise ValueError(f"oversample + hard_examples must be below 1, got {self.oversample + self.hard_examples}")
        return self


class SequenceStage(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    crop: int = Field(32, ge=2)  # slices per training crop
    learning_rate: float = Field(3e-3, gt=0)


class ExportSection(_Section):
    name: str = "ich-model"
    version: str = "0.1.0"
    trained_on: str = "unspecified"
    intended_use: str = "Research and software testing of ichnode."
    disclaimer: str = "Not for clinical use."
    series_aggregation: Literal["max", "mean", "top3_mean"] = "max"
    test_time_flip: bool = False  # the node also scores each slice mirrored and averages (card field)
    any_sensitivity: float = Field(0.95, gt=0, le=1)
    subtype_thresholds: Literal["youden", "sensitivity"] = "youden"


class TrainConfig(_Section):
    seed: int = 1234
    data: DataSection = DataSection()
    input: InputSection = InputSection()
    architecture: dict[str, Any] = {}
    slice_stage: SliceStage = SliceStage()
    sequence_stage: SequenceStage = SequenceStage()
    export: ExportSection = ExportSection()

    @field_validator("architecture")
    @classmethod
    def _arch(cls, value: dict[str, Any]) -> dict[str, Any]:
        from training.models import ArchitectureConfig

        ArchitectureConfig.from_config(value)  # raises naming the bad key/value
        return value

    @property
    def arch(self) -> Any:
        """The :class:`training.models.ArchitectureConfig`."""
        from training.models import ArchitectureConfig

        return ArchitectureConfig.from_config(self.architecture)

    @property
    def channels(self) -> int:
        return len(self.input.windows) * (2 * self.input.context_slices + 1)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise click.ClickException(f"config {path}: {exc}") from exc
        except (ValidationError, ValueError) as exc:
            raise click.ClickException(f"config {path} is invalid: {exc}") from exc


def _verbose() -> int | str:
    return 1 if sys.stdout.isatty() else 2


class JsonHistory:
    """Appends each epoch's logs of a stage to ``history.json``."""

    def __init__(self, path: Path, stage: str) -> None:
        import keras

        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                outer.append(epoch, logs or {})

        self.path, self.stage, self.callback = path, stage, _Callback()

    def append(self, epoch: int, logs: dict) -> None:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        entries = [e for e in data.get(self.stage, []) if e["epoch"] != epoch]
        entries.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        data[self.stage] = entries
        self.path.write_text(json.dumps(data, indent=1))


class Run:
    """One training run in ``out``; every step writes its result there."""

    def __init__(self, data_dir: Path, config: TrainConfig, out: Path, command: str, progress: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.out = Path(out)
        self.command = command
        self.progress = progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache_dir = config.data.cache_dir or self.out / "cache"
        self.hard_rows: np.ndarray | None = None  # see hardest_slices

    # -------------------------------------------------------------- resume
    def stage_settings(self, stage: str) -> dict[str, Any]:
        """What shapes the model of ``stage`` ("slice" or "sequence"), by dotted
        name; the sequence stage is trained on the slice stage's embeddings."""
        dumped = self.config.model_dump(mode="json")
        settings = {
            "seed": self.config.seed,
            "input": dumped["input"],
            "architecture": self.config.arch.get_config(),  # defaults spelt out or left out alike
            # The split is kept in split.csv; the cache settings give the pixels trained on.
            "data": {key: dumped["data"][key] for key in ("split", "split_from", "cache", "cache_dtype")},
            "slice_stage": dumped["slice_stage"],
        }
        if stage == "sequence":
            settings["sequence_stage"] = dumped["sequence_stage"]
        return _dotted(settings)

    def _stage_artefacts(self, stage: str) -> list[Path]:
        artefacts = [self.out / ("slice_model.keras" if stage == "slice" else "sequence_head.keras"),
                     self.out / "backup" / stage, self.out / "checkpoints" / f"{stage}_best.keras"]
        return artefacts + ([self.out / "hard_examples.csv"] if stage == "slice" else [])

    def _record_stage_settings(self, stage: str) -> None:
        path = self.out / STAGE_SETTINGS
        recorded = json.loads(path.read_text()) if path.exists() else {}
        recorded[stage] = self.stage_settings(stage)
        path.write_text(json.dumps(recorded, indent=1))

    def refuse_changed_stage_settings(self) -> None:
        """Refuse to resume a stage begun or finished with other settings that
        shape its model (it would be kept, and carded with this config's), before
        indexing and caching the data; a slice model from before the settings
        were recorded is checked for its input shape and architecture."""
        path = self.out / STAGE_SETTINGS
        recorded = json.loads(path.read_text()) if path.exists() else {}
        for stage in ("slice", "sequence"):
            if not any(p.exists() for p in self._stage_artefacts(stage)):
                continue
            if stage not in recorded:
                if stage == "slice" and (self.out / "slice_model.keras").exists():
                    logger.warning("%s records no settings of the slice stage (an older run): only its model's input "
                                   "and architecture are checked against this config", self.out)
                    self._check_slice_model(self.out / "slice_model.keras", "the slice model of this run folder",
                                            "use a new run folder, or the settings it was trained with")
                continue
            now = self.stage_settings(stage)
            changed = [key for key in dict.fromkeys([*recorded[stage], *now])
                       if recorded[stage].get(key, _UNSET) != now.get(key, _UNSET)]
            if changed:
                raise click.ClickException(
                    f"{self.out} holds a {stage} stage trained with other settings than this config's: "
                    + ", ".join(f"{key} {_shown(recorded[stage], key)} -> {_shown(now, key)}" for key in changed)
                    + f". Its model would be kept and described by this config in the card: use a new run folder, "
                    f"or the settings recorded in {path}"
                )

    # ---------------------------------------------------------------- data
    def prepare_data(self) -> None:
        cfg = self.config
        if cfg.slice_stage.init_from is not None:
            self._check_slice_model(cfg.slice_stage.init_from, f"slice_stage.init_from {cfg.slice_stage.init_from}",
                                    "use the input settings and `architecture` section of the run that made it")
        try:
            self.index = rsna.build_index(
                self.data_dir, self.cache_dir, workers=cfg.data.workers, progress=self.progress
            )
        except rsna.DataError as exc:
            raise click.ClickException(str(exc)) from exc
        if not rsna.has_labels(self.index):
            raise click.ClickException(f"{self.data_dir} has no {rsna.TRAIN_CSV}: cannot train")
        self.index["split"] = self.split()
        # Before the slice cache (hours on the full set): training needs series in
        # both splits; without validation series the sequence stage would wait for
        # ever on an empty validation set, and thresholds could not be chosen.
        self._refuse_empty_splits(self.index["split"].to_numpy(), "patients")
        # Without the cache every slice is still decoded once up front (and not
        # kept): one that cannot be would otherwise stop training mid-epoch.
        checked = rsna.build_slice_cache(
            self.index, self.data_dir, self.cache_dir, cfg.input.windows, cfg.input.size,
            dtype=cfg.data.cache_dtype, workers=cfg.data.workers, progress=self.progress,
            pixels=cfg.data.cache,
        )
        self.cache = checked if cfg.data.cache else None
        self.ok = checked.ok()
        k = cfg.input.context_slices
        self.neighbours = rsna.neighbour_rows(self.index, k, self.ok)
        self.loader = rsna.SliceLoader(
            self.index, self.neighbours, k, cfg.input.windows, cfg.input.size,
            cache=self.cache, data_dir=None if self.cache else self.data_dir,
        )
        self.labels = rsna.label_matrix(self.index)
        split = self.index["split"].to_numpy()
        self.rows = {name: np.flatnonzero((split == name) & self.ok) for name in cfg.data.split}
        logger.info(
            "slices: %s", {name: len(rows) for name, rows in self.rows.items()}
        )
        self._refuse_empty_splits(np.where(self.ok, split, ""), "slices that could be decoded")

    def _refuse_empty_splits(self, split: np.ndarray, what: str) -> None:
        empty = [name for name in ("train", "val") if not (split == name).any()]
        if empty:
            counts = {name: int(self.index.loc[split == name, "series_uid"].nunique()) for name in ("train", "val")}
            raise click.ClickException(
                f"the {' and '.join(empty)} split has no {what} (series per split: {counts}, "
                f"{self.index['patient_id'].nunique()} patients in {self.data_dir}): training needs both. Give "
                "data.split a positive val fraction and data of several patients (with data.split_from: patients "
                "in both of its splits, or new ones)."
            )

    def _check_slice_model(self, path: Path, what: str, advice: str) -> None:
        """Refuse a slice model (``what``: where it comes from) of another input
        shape, or of another architecture than the config's (which the model card
        records), before indexing and caching the data (hours on the full set),
        not inside ``fit`` or at export."""
        import keras

        from training import models

        try:
            model = keras.saving.load_model(path, compile=False)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{what}: {exc}") from exc
        have = tuple(model.inputs[0].shape[1:])
        want = (*self.config.input.size, self.config.channels)
        if have != want:
            raise click.ClickException(
                f"{what} takes inputs of shape {have}, but input.size and the windows and context_slices of this "
                f"config give {want}: {advice}"
            )
        encoder = models.build_slice_encoder(want, self.config.arch)
        described = models.build_slice_model(encoder, models.build_slice_head())
        if [tuple(w.shape) for w in model.weights] != [tuple(w.shape) for w in described.weights]:
            raise click.ClickException(
                f"{what} is not of the architecture this config describes, which the model card would record: {advice}"
            )

    def split(self) -> pd.Series:
        """Each index row's split, kept in ``split.csv``: a stage artefact like the
        models, so a run resumed with another ``seed`` or ``data.split`` keeps the
        patients its slice CNN was trained on out of validation."""
        cfg, path = self.config, self.out / "split.csv"
        columns = ["patient_id", "study_uid", "series_uid", "image_id", "split"]
        if cfg.data.split_from is None:
            split = rsna.split_by_patient(self.index, cfg.data.split, cfg.seed)
        else:
            split = rsna.split_like(self.index, cfg.data.split_from, cfg.data.split, cfg.seed)
        gone = None
        if path.exists():
            try:
                kept = rsna.split_like(self.index, path, cfg.data.split, cfg.seed)
            except ValueError as exc:
                raise click.ClickException(f"{exc}: {self.out} is a run on other data; use a new run folder") from exc
            logger.info("split: kept %s of this run's earlier stages", path)
            earlier = pd.read_csv(path, dtype=str, keep_default_na=False)
            if not kept.equals(split):
                # Other patients split otherwise by the same config: say which cause it is.
                before, now = set(earlier["patient_id"]), set(self.index["patient_id"])
                if before != now:
                    logger.warning(
                        "split: the data changed since %s was written (%d patients new, %d no longer in the data); "
                        "its patients keep their split, new patients are split anew.",
                        path, len(now - before), len(before - now),
                    )
                else:
                    logger.warning(
                        "split: seed, data.split or data.split_from now split the patients otherwise; %s is kept "
                        "(only new patients are split anew). Use a new run folder to split anew.", path,
                    )
            split = kept
            # Patients no longer in the data keep their line, should they come back.
            gone = earlier.loc[~earlier["patient_id"].isin(self.index["patient_id"]), columns]
        table = self.index.assign(split=split)[columns]
        pd.concat([table, gone] if gone is not None else [table]).to_csv(path, index=False)
        return split

    def dataset(self, split: str, *, training: bool, repeat: bool, batch_size: int) -> Any:
        stage = self.config.slice_stage
        return rsna.slice_dataset(
            self.loader, self.rows[split], self.labels, batch_size=batch_size,
            shuffle=training, seed=self.config.seed, repeat=repeat,
            augment=training and stage.augment,
            oversample=stage.oversample if training and repeat else 0.0,
            hard_rows=self.hard_rows if training and repeat else None,
            hard_fraction=stage.hard_examples if training and repeat else 0.0,
        )

    # ------------------------------------------------------------- stage 1
    def train_slice_stage(self) -> Any:
        import keras

        from training import models

        path = self.out / "slice_model.keras"
        if path.exists():
            logger.info("slice stage done: %s", path)
            return keras.saving.load_model(path, compile=False)
        self._record_stage_settings("slice")
        cfg, stage = self.config, self.config.slice_stage
        n_train = len(self.rows["train"])
        steps = stage.steps_per_epoch or math.ceil(n_train / stage.batch_size)
        val_steps = stage.validation_steps or math.ceil(len(self.rows["val"]) / stage.batch_size)
        strategy = models.distribution_strategy()
        with strategy.scope():
            if stage.init_from is not None:
                logger.info("slice stage: fine-tuning %s", stage.init_from)
                model = keras.saving.load_model(stage.init_from, compile=False)
                if stage.hard_examples > 0:
                    self.hard_rows = self.hardest_slices(model)
            else:
                encoder = models.build_slice_encoder((*cfg.input.size, cfg.channels), cfg.arch)
                model = models.build_slice_model(encoder, models.build_slice_head())
            schedule = keras.optimizers.schedules.CosineDecay(
                stage.learning_rate, decay_steps=steps * stage.epochs, alpha=0.05,
                warmup_target=None,
            )
            model.compile(
                optimizer=keras.optimizers.AdamW(schedule, weight_decay=stage.weight_decay),
                loss=models.WeightedBinaryCrossentropy(),
                metrics=[keras.metrics.AUC(multi_label=True, num_labels=len(LABELS), name="auc")],
            )
        best = self.out / "checkpoints" / "slice_best.keras"
        best.parent.mkdir(exist_ok=True)
        model.fit(
            self.dataset("train", training=True, repeat=True, batch_size=stage.batch_size),
            steps_per_epoch=steps,
            epochs=stage.epochs,
            validation_data=self.dataset("val", training=False, repeat=True, batch_size=stage.batch_size),
            validation_steps=val_steps,
            callbacks=self._callbacks("slice", best),
            shuffle=False,  # the dataset shuffles
            verbose=_verbose(),
        )
        model = keras.saving.load_model(best, compile=False)
        model.save(path)
        return model

    def hardest_slices(self, model: Any) -> np.ndarray:
        """The training rows ``model`` gets most wrong: the top ``hard_pool`` by
        per-slice weighted log loss (kept in RUNDIR/hard_examples.csv, so a
        resumed run draws from the same ones)."""
        path = self.out / "hard_examples.csv"
        rows = self.rows["train"]
        if path.exists():
            # By image, not by row: row numbers change when the index is rebuilt.
            kept = pd.read_csv(path, dtype={"image_id": str})["image_id"]
            by_image = pd.Series(rows, index=self.index["image_id"].to_numpy()[rows])
            found = kept[kept.isin(by_image.index)]
            if len(found):
                if len(found) < len(kept):
                    logger.warning("hard slices: %d of the %d in %s are no longer training slices; drawing from "
                                   "the other %d", len(kept) - len(found), len(kept), path, len(found))
                return by_image.loc[found].to_numpy()
            logger.warning("hard slices: none of those in %s is a training slice now; ranking them anew", path)
        ds = rsna.slice_dataset(self.loader, rows, self.labels, batch_size=64, shuffle=False, seed=0, repeat=False)
        from tqdm import tqdm

        probs = np.concatenate([
            np.asarray(model.predict_on_batch(x))
            for x, _ in tqdm(ds, total=math.ceil(len(rows) / 64), desc="rank hard slices", disable=not self.progress)
        ])
        loss = M.sample_log_loss(self.labels[rows], probs)
        hardest = np.argsort(-loss)[: max(1, round(self.config.slice_stage.hard_pool * len(rows)))]
        table = pd.DataFrame({"row": rows[hardest], "image_id": self.index["image_id"].to_numpy()[rows[hardest]],
                              "loss": loss[hardest], "positive": self.labels[rows[hardest], 0] > 0.5})
        table.to_csv(path, index=False)
        logger.info("hard slices: %d of %d training slices (loss >= %.3f), %d positive",
                    len(table), len(rows), table["loss"].min(), int(table["positive"].sum()))
        return table["row"].to_numpy()

    def _callbacks(self, stage: str, best: Path) -> list:
        import keras

        backup = self.out / "backup" / stage
        return [
            keras.callbacks.BackupAndRestore(str(backup)),
            keras.callbacks.ModelCheckpoint(
                str(best), monitor="val_loss", save_best_only=True,
                initial_value_threshold=self._best_val_loss(stage, backup, best),
            ),
            keras.callbacks.CSVLogger(str(self.out / f"history_{stage}.csv"), append=True),
            JsonHistory(self.out / "history.json", stage).callback,
            keras.callbacks.TerminateOnNaN(),
        ]

    def _best_val_loss(self, stage: str, backup: Path, best: Path) -> float | None:
        """The lowest val_loss of the epochs an interrupted stage has behind it,
        or None when it starts afresh.  ModelCheckpoint forgets its best value
        with the process (BackupAndRestore does not keep it), so without this
        the first epoch after a resume replaces a better checkpoint."""
        state, history = backup / "training_metadata.json", self.out / "history.json"
        if not (state.exists() and best.exists() and history.exists()):
            return None
        done = json.loads(state.read_text())["epoch"]
        # Entries of epochs not yet redone may be of an earlier, finished training.
        losses = [
            e["val_loss"] for e in json.loads(history.read_text()).get(stage, [])
            if e["epoch"] < done and math.isfinite(e.get("val_loss", math.nan))
        ]
        if not losses:
            return None
        logger.info("%s stage resumes after epoch %d; best val_loss so far %.5f", stage, done, min(losses))
        return min(losses)

    # ---------------------------------------------------------- embeddings
    def embeddings(self, slice_model: Any) -> np.ndarray:
        """Slice CNN embeddings of every usable slice (``np.nan`` elsewhere)."""
        path = self.out / "embeddings.npz"
        encoder = slice_model.get_layer("slice_encoder")
        # Rows are index rows: embeddings of another index (data added, removed or
        # rewritten since) would hand the sequence stage other slices' embeddings,
        # and those of another slice model (one trained again) that model's.
        fingerprint = f"{self._index_fingerprint()} {_weights_sha256(encoder)}"
        if path.exists():
            with np.load(path) as stored:
                if "fingerprint" in stored and str(stored["fingerprint"]) == fingerprint:
                    return stored["embeddings"]
            logger.warning(
                "%s was computed on another index of the data or by another slice model: computing the embeddings "
                "anew", path)
        dim = int(encoder.outputs[0].shape[-1])
        emb = np.full((len(self.index), dim), np.nan, dtype=np.float32)
        rows = np.flatnonzero(self.ok)
        batch = max(32, self.config.slice_stage.batch_size)
        ds = rsna.slice_dataset(self.loader, rows, self.labels, batch_size=batch, shuffle=False,
                                seed=0, repeat=False)
        from tqdm import tqdm

        start = 0
        for x, _ in tqdm(ds, total=math.ceil(len(rows) / batch), desc="embed slices", disable=not self.progress):
            e = np.asarray(encoder.predict_on_batch(x))
            emb[rows[start : start + len(e)]] = e
            start += len(e)
        np.savez(path, embeddings=emb, fingerprint=np.array(fingerprint))
        return emb

    def _index_fingerprint(self) -> str:
        """What each index row is: its image, file (size, mtime) and whether it is used."""
        digest = hashlib.sha256()
        for image, size, mtime, ok in zip(self.index["image_id"], self.index["file_size"],
                                          self.index["file_mtime_ns"], self.ok):
            digest.update(f"{image}\t{size}\t{mtime}\t{int(ok)}\n".encode())
        return digest.hexdigest()

    # ------------------------------------------------------------- stage 2
    def series_rows(self, split: str) -> list[np.ndarray]:
        keep = (self.index["split"].to_numpy() == split) & self.ok
        return [rows for _, rows in rsna.iter_series(self.index, keep)]

    def train_sequence_stage(self, embeddings: np.ndarray) -> Any:
        import keras
        import tensorflow as tf

        from training import models

        path = self.out / "sequence_head.keras"
        if path.exists():
            logger.info("sequence stage done: %s", path)
            return keras.saving.load_model(path, compile=False)
        self._record_stage_settings("sequence")
        cfg, stage = self.config, self.config.sequence_stage
        train, val = self.series_rows("train"), self.series_rows("val")
        dim = embeddings.shape[1]
        rng = np.random.default_rng(cfg.seed)

        # An empty list would make these loop for ever without yielding, and fit
        # wait on them silently (prepare_data refuses such splits already).
        def crops() -> Any:
            if not train:
                raise ValueError("the train split has no series: nothing to train the sequence stage on")
            while True:
                items = []
                for i in rng.permutation(len(train)):
                    rows = train[i]
                    length = min(stage.crop, len(rows))
                    start = int(rng.integers(0, len(rows) - length + 1))
                    items.append(rows[start : start + length])
                by_length: dict[int, list[np.ndarray]] = {}
                for rows in items:
                    by_length.setdefault(len(rows), []).append(rows)
                batches = [
                    group[i : i + stage.batch_size]
                    for group in by_length.values()
                    for i in range(0, len(group), stage.batch_size)
                ]
                for b in rng.permutation(len(batches)):
                    rows = np.stack(batches[b])
                    yield embeddings[rows], self.labels[rows]

        def whole(series: list[np.ndarray]) -> Any:
            if not series:
                raise ValueError("the val split has no series: nothing to validate the sequence stage on")
            while True:
                for rows in series:
                    yield embeddings[rows][None], self.labels[rows][None]

        signature = (
            tf.TensorSpec((None, None, dim), tf.float32),
            tf.TensorSpec((None, None, len(LABELS)), tf.float32),
        )
        train_ds = tf.data.Dataset.from_generator(crops, output_signature=signature).prefetch(2)
        val_ds = tf.data.Dataset.from_generator(lambda: whole(val), output_signature=signature).prefetch(2)
        steps = max(1, math.ceil(len(train) / stage.batch_size))
        strategy = models.distribution_strategy()
        with strategy.scope():
            sequence = models.build_sequence_head(dim, cfg.arch)
            sequence.compile(
                optimizer=keras.optimizers.Adam(
                    keras.optimizers.schedules.CosineDecay(stage.learning_rate, steps * stage.epochs, alpha=0.05)
                ),
                loss=models.WeightedBinaryCrossentropy(),
            )
        best = self.out / "checkpoints" / "sequence_best.keras"
        best.parent.mkdir(exist_ok=True)
        sequence.fit(
            train_ds, steps_per_epoch=steps, epochs=stage.epochs,
            validation_data=val_ds, validation_steps=max(1, len(val)),
            callbacks=self._callbacks("sequence", best), verbose=_verbose(), shuffle=False,
        )
        sequence = keras.saving.load_model(best, compile=False)
        sequence.save(path)
        return sequence

    # -------------------------------------------------------------- export
    def export(self, slice_model: Any, sequence: Any | None) -> Path:
        """Assemble the model, choose its thresholds on the validation split as
        the node will score it (each series read from its DICOM files as the node
        reads it, float32, not from the float16 training cache; scored by
        ``ichnode.model``, so with ``test_time_flip`` too), and save it with its card."""
        from ichnode.model import HemorrhageModel
        from training import export, models
        from training.evaluate import series_volumes

        cfg = self.config
        full = models.assemble(slice_model.get_layer("slice_encoder"), slice_model.get_layer("slice_head"), sequence)

        def card(**fields: Any) -> Any:
            return export.make_card(cfg, command=self.command, sequence_stage=sequence is not None, **fields)

        node_model = HemorrhageModel(full, card(thresholds=dict.fromkeys(LABELS, 0.5), metrics={}))
        ids, y_true, y_prob, y_prob_slice = [], [], [], []
        volumes = series_volumes(self.index, self.data_dir, self.series_rows("val"), node_model.card,
                                 cfg.data.workers or rsna.default_workers())
        for n, (rows, x, failures) in enumerate(volumes):
            if failures:  # the decoding check passed them: the files changed since
                logger.warning("export: %d validation slices of series %s could not be read now, left out: %s",
                               len(failures), self.index["series_uid"].iat[failures[0][0]], failures[0][1])
            if x is None:
                continue
            y_prob.append(node_model.predict_series(x))
            y_prob_slice.append(node_model.predict_slices(x))
            y_true.append(self.labels[rows])
            ids += [n] * len(rows)
        y_true_a, y_prob_a = np.concatenate(y_true), np.concatenate(y_prob)
        _, s_true, s_prob = M.series_level(ids, y_true_a, y_prob_a, cfg.export.series_aggregation)
        thresholds = M.choose_thresholds(
            s_true, s_prob, cfg.export.any_sensitivity, cfg.export.subtype_thresholds
        )
        validation = M.report(ids, y_true_a, y_prob_a, thresholds, cfg.export.series_aggregation)
        slice_only = M.report(ids, y_true_a, np.concatenate(y_prob_slice), thresholds, cfg.export.series_aggregation)
        validation["slice_stage_only"] = {
            k: slice_only[k] for k in ("weighted_log_loss", "slice_auc", "series_auc")
        }
        rule = (
            f"series-level on the validation split: any at {cfg.export.any_sensitivity:.0%} "
            f"sensitivity, subtypes by {cfg.export.subtype_thresholds}"
        )
        # A label without positive validation series has no threshold by the rule:
        # the card must not present its 0.5 as chosen (the node flags at it).
        fallback = M.threshold_fallbacks(s_true, cfg.export.subtype_thresholds)
        if fallback:
            logger.warning("thresholds: no positive (or no negative) validation series for %s: threshold 0.5, "
                           "not chosen by the rule", ", ".join(fallback))
            rule += f"; except {', '.join(fallback)}: 0.5, a placeholder (no positive or no negative validation series)"
        final = card(thresholds=thresholds, metrics={
            "validation": validation, "threshold_rule": rule, "threshold_fallback": fallback,
        })
        return export.save(full, final, self.out / "export", cfg.export.name)

    def run(self) -> Path:
        import keras

        keras.utils.set_random_seed(self.config.seed)
        started = time.monotonic()
        self.refuse_changed_stage_settings()
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        self.prepare_data()
        slice_model = self.train_slice_stage()
        sequence = None
        if self.config.arch.sequence != "none":
            embeddings = self.embeddings(slice_model)
            sequence = self.train_sequence_stage(embeddings)
        path = self.export(slice_model, sequence)
        logger.info("run finished in %.0f s: %s", time.monotonic() - started, path)
        return path


_UNSET = object()  # a setting one of two configs lacks


def _weights_sha256(model: Any) -> str:
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def _dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"section.key": value}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(settings: dict[str, Any], key: str) -> str:
    return json.dumps(settings[key]) if key in settings else "(unset)"


def command_line(data_dir: Path, config_path: Path, out: Path) -> str:
    """The command that makes this run, as recorded in the model card."""
    return "python -m training.train " + shlex.join(
        ["--data", str(data_dir), "--config", str(config_path), "--out", str(out)]
    )


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data folder in the RSNA layout.")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training configuration (YAML).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder; running again with the same folder resumes.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(data_dir: Path, config_path: Path, out: Path, quiet: bool) -> None:
    """Train the slice and sequence stages and export the model with its card."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig.load(config_path)
    path = Run(data_dir, config, out, command_line(data_dir, config_path, out), progress=not quiet).run()
    click.echo(f"exported {path}")


if __name__ == "__main__":
    main()
