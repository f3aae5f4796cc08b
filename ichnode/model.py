"""Loading the hemorrhage model and its model card; batched prediction.

A model is two files side by side::

    NAME.keras        the Keras 3 model (weights + architecture)
    NAME.card.json    its model card (:class:`ModelCard`)

The node refuses a model whose card is missing, unreadable or inconsistent
(with the label order it reports, or with the model's input/output shapes):
:func:`load_model` raises :class:`ModelCardError` naming the card field.

Contract of the ``.keras`` file
-------------------------------
Only built-in Keras layers are used, so the file loads on any Keras 3 backend
without custom objects.  Two kinds of model are accepted, told apart by the
card's ``sequence_stage``:

``sequence_stage = false`` (single stage)
    ``model(x)`` maps slices ``(B, H, W, C)`` to probabilities ``(B, 6)``.

``sequence_stage = true`` (two stages, as the bundled default)
    The top-level model maps one batch of series ``(S, N, H, W, C)`` to
    ``{"probs": (S, N, 6), "slice_probs": (S, N, 6)}`` and holds three named
    sub-layers the node uses directly (found also inside wrappers such as
    the ``TimeDistributed`` layer ``per_slice``):

    - ``slice_encoder``: a model ``(B, H, W, C) -> (B, E)``, the per-slice
      CNN producing one embedding per slice;
    - ``slice_head``: a layer ``(..., E) -> (..., 6)``, slice-only
      probabilities (used by :meth:`HemorrhageModel.predict_slices`);
    - ``sequence_head``: a model ``(S, N, E) -> (S, N, 6)`` that refines each
      slice's probabilities from the embeddings of the whole series (its
      neighbours), in z order.

So a worker can batch the expensive CNN stage across series and then run the
cheap sequence stage per series::

    emb = model.embed_slices(x_all)              # (sum N_i, E), any mix of series
    probs_i = model.score_sequence(emb[a_i:b_i])   # (N_i, 6), one series in z order
    scores = series_scores(probs_i, model.card)    # {label: float}
    found = flags(scores, model.card.thresholds)   # {label: bool}

which is exactly what :meth:`HemorrhageModel.predict_series` does for one
series.  The worker feeds the CNN stage through
:meth:`HemorrhageModel.slice_stage_on_rows` instead: the slices unstacked,
with the indices of each one's neighbours, so that the 2.5D stacking runs
in the model's graph, on its device.

With the card's ``test_time_flip`` every slice is also scored
mirrored left-right and the two probabilities are averaged; the embeddings
are then the slice's and its mirror image's, side by side (``2E``), and
:meth:`HemorrhageModel.score_sequence` runs the sequence stage on each half.
Inputs are float32 ``(H, W, C)`` slices as produced by
``ichnode.imaging.preprocess_series(datasets, card.windows, card.input_size,
card.context_slices)``; ``C == card.channels == len(windows) * (2k + 1)``.

All probabilities are in label order :data:`LABELS`.  This module uses numpy
and backend-neutral Keras only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ichnode.config import LABELS

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_NAME = "ich-phantom-default"
CARD_SUFFIX = ".card.json"
CARD_FORMAT = 1

AGGREGATIONS = ("max", "mean", "top3_mean")

# Under JAX the embeddings of a series are padded to a multiple of this many
# slices (masked out), so that a new series length rarely compiles anew.
SEQUENCE_BUCKET = 32

# Names of the sub-layers of a two-stage model (see the module docstring).
SLICE_ENCODER = "slice_encoder"
SLICE_HEAD = "slice_head"
SEQUENCE_HEAD = "sequence_head"


class ModelCardError(ValueError):
    """The model card is missing, unreadable, invalid or does not fit the model."""


class ModelCard(BaseModel):
    """Everything the node needs to feed a model and to read its output.

    Validation checks the card on its own (labels, channel count, thresholds);
    :func:`load_model` then checks it against the model's shapes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    card_format: int = CARD_FORMAT
    # At most what every result row holds of them (db.SeriesResult): a server
    # database refuses longer values, and no result could be recorded.
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    labels: tuple[str, ...]
    input_size: tuple[int, int]
    windows: tuple[tuple[float, float], ...] = Field(min_length=1)
    context_slices: int = Field(ge=0)
    channels: int = Field(ge=1)
    sequence_stage: bool
    series_aggregation: Literal["max", "mean", "top3_mean"] = "max"
    # Also score each slice mirrored left-right and average: the anatomy is
    # nearly symmetric, so the mirror image is a second look at a faint bleed.
    test_time_flip: bool = False
    thresholds: dict[str, float]
    trained_on: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    disclaimer: str = Field(min_length=1)
    command: str = Field(min_length=1)
    seed: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    architecture: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    keras_version: str | None = None

    @field_validator("card_format")
    @classmethod
    def _format(cls, value: int) -> int:
        if value != CARD_FORMAT:
            raise ValueError(f"unsupported card format {value}, this node reads {CARD_FORMAT}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(value) != LABELS:
            raise ValueError(f"labels must be {list(LABELS)} in this order, got {list(value)}")
        return value

    @field_validator("input_size")
    @classmethod
    def _size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError(f"input_size must be [H, W] with H, W >= 8, got {list(value)}")
        return value

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        for center, width in value:
            if not (math.isfinite(center) and math.isfinite(width) and width > 0):
                raise ValueError(f"each window must be [center, width > 0], got {[center, width]}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != set(LABELS):
            raise ValueError(
                f"thresholds must give one value for each of {list(LABELS)}, got {sorted(value)}"
            )
        for label, threshold in value.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {label!r} must be in [0, 1], got {threshold}")
        return {label: float(value[label]) for label in LABELS}

    @model_validator(mode="after")
    def _channels(self) -> ModelCard:
        expected = len(self.windows) * (2 * self.context_slices + 1)
        if self.channels != expected:
            raise ValueError(
                f"channels={self.channels} but len(windows) * (2 * context_slices + 1) = "
                f"{len(self.windows)} * {2 * self.context_slices + 1} = {expected}"
            )
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one model input slice, ``(H, W, C)``."""
        return (self.input_size[0], self.input_size[1], self.channels)

    @classmethod
    def from_json(cls, path: Path) -> ModelCard:
        """Read and validate a card; every error names ``path`` and the field."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelCardError(f"model card {path} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelCardError(f"model card {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelCardError(f"model card {path} must hold a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in err['loc']) or '(card)'!r}: {err['msg']}"
                for err in exc.errors()
            )
            raise ModelCardError(f"model card {path} is invalid: {problems}") from None

    def to_json(self, path: Path) -> None:
        """Write the card as indented JSON."""
        Path(path).write_text(
            json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )


def card_path_for(model_path: Path) -> Path:
    """``dir/NAME.keras`` -> ``dir/NAME.card.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".keras") + CARD_SUFFIX)


def default_model_path() -> Path:
    """The bundled default model shipped in ``ichnode/models/``."""
    return DEFAULT_MODEL_DIR / f"{DEFAULT_MODEL_NAME}.keras"


def _resolve(path: Path | None) -> Path:
    if path is None:
        return default_model_path()
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.keras"))
        if len(found) != 1:
            raise ModelCardError(
                f"model path {path} is a folder holding {len(found)} .keras files, expected 1"
            )
        return found[0]
    return path


def _find_layer(model: Any, name: str) -> Any:
    """The layer called ``name`` in ``model``, looking inside wrappers
    (``TimeDistributed``) and nested models; ``None`` when absent."""
    for layer in getattr(model, "layers", ()):
        inner = getattr(layer, "layer", None)  # wrappers keep the wrapped layer here
        if layer.name == name:
            return layer
        if inner is not None and inner.name == name:
            return inner
        found = _find_layer(inner if inner is not None else layer, name)
        if found is not None:
            return found
    return None


class HemorrhageModel:
    """A loaded model with its card; see the module docstring for the contract.

    Build it with :func:`load_model`.  Prediction runs Keras' compiled predict
    step (``predict_on_batch``) on chunks of ``batch_size`` slices.  TensorFlow
    traces it with ``reduce_retracing``: after the first few calls new batch
    sizes or series lengths do not recompile.  JAX compiles once per input
    shape, so there a smaller last chunk is padded to ``batch_size`` (rows are
    scored independently; the padding is dropped), and a series' embeddings
    to a multiple of :data:`SEQUENCE_BUCKET` slices, masked out.
    """

    def __init__(self, keras_model: Any, card: ModelCard, path: Path | None = None) -> None:
        import keras

        self.card = card
        self.path = path
        self.keras_model = keras_model
        self._pad_chunks = keras.backend.backend() == "jax"
        where = f"model {path}" if path else "model"
        if card.sequence_stage:
            encoder = _find_layer(keras_model, SLICE_ENCODER)
            head = _find_layer(keras_model, SLICE_HEAD)
            sequence = _find_layer(keras_model, SEQUENCE_HEAD)
            if encoder is None or head is None or sequence is None:
                raise ModelCardError(
                    f"{where}: card field 'sequence_stage' is true but the model lacks "
                    f"layer {SLICE_ENCODER!r}, {SLICE_HEAD!r} or {SEQUENCE_HEAD!r}"
                )
            self._encoder = encoder
            self._sequence = sequence
            self.embedding_dim = int(encoder.outputs[0].shape[-1])
            input_shape = tuple(encoder.inputs[0].shape[1:])
            self._check_input(input_shape, where)
            slice_input = keras.Input(input_shape, name="slice")
            self._slice_model = keras.Model(slice_input, head(encoder(slice_input)), name="slices")
            seq_in = tuple(sequence.inputs[0].shape[2:])
            if seq_in != (self.embedding_dim,):
                raise ModelCardError(
                    f"{where}: sequence_head takes {seq_in}, slice_encoder gives "
                    f"({self.embedding_dim},)"
                )
        else:
            if _find_layer(keras_model, SEQUENCE_HEAD) is not None:
                raise ModelCardError(
                    f"{where}: card field 'sequence_stage' is false but the model has "
                    f"a {SEQUENCE_HEAD!r} layer"
                )
            self._encoder = None
            self._sequence = None
            self._slice_model = keras_model
            self.embedding_dim = None
            self._check_input(tuple(keras_model.inputs[0].shape[1:]), where)
        output_dim = self._slice_model.outputs[0].shape[-1]
        if output_dim != len(card.labels):
            raise ModelCardError(
                f"{where}: card field 'labels' lists {len(card.labels)} labels, "
                f"the model outputs {output_dim}"
            )
        # Under JAX a series' embeddings are padded to whole buckets (masked),
        # where every layer of the sequence stage honours the mask.
        masks = self._sequence is not None and _honours_masks(self._sequence)
        self._pad_sequences = self._pad_chunks and masks
        halves = 1
        if card.test_time_flip:
            self._slice_model = _with_mirror_image(self._slice_model, keras.layers.Average())
            if self._encoder is not None:
                self._encoder = _with_mirror_image(self._encoder, keras.layers.Concatenate())
                halves = 2
        if self._sequence is not None:
            self._sequence = _masked_sequence(self._sequence, self.embedding_dim, halves, masks)
            self.embedding_dim *= halves
        self._on_rows = _stacking_in_graph(self._encoder if self._encoder is not None else self._slice_model, card)

    def _check_input(self, input_shape: tuple, where: str) -> None:
        card = self.card
        if input_shape != card.input_shape:
            field = "channels" if input_shape[:2] == tuple(card.input_size) else "input_size"
            raise ModelCardError(
                f"{where}: card field {field!r} does not fit the model: card says input "
                f"(H, W, C) = {card.input_shape}, model takes {input_shape}"
            )

    def __repr__(self) -> str:
        return f"HemorrhageModel({self.card.name!r}, version={self.card.version!r})"

    @property
    def has_sequence_stage(self) -> bool:
        return self._sequence is not None

    @property
    def pads_batches(self) -> bool:
        """Whether a partial batch is padded to the full batch size (JAX: one
        compiled shape), and so costs the model as much as a full one."""
        return self._pad_chunks

    def _check_slices(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.card.input_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.card.input_shape))}), "
                f"got {x.shape}"
            )
        return x

    def _batched(self, fn: Any, x: np.ndarray, batch_size: int, width: int) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(x), width), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            count = len(chunk)
            if self._pad_chunks and count < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - count, *chunk.shape[1:]), chunk.dtype)])
            out[start : start + count] = np.asarray(fn(chunk), dtype=np.float32)[:count]
        return out

    def predict_slices(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Slice-stage probabilities ``(B, 6)`` for slices ``x`` ``(B, H, W, C)``.

        For a two-stage model these ignore the neighbouring slices beyond the
        2.5D context; :meth:`predict_series` gives the refined scores.
        """
        x = self._check_slices(x)
        return self._batched(self._slice_model.predict_on_batch, x, batch_size, len(LABELS))

    def embed_slices(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Slice embeddings ``(B, E)`` (two-stage models only); slices may mix series."""
        if self._encoder is None:
            raise TypeError(f"{self!r} has no sequence stage, use predict_slices")
        x = self._check_slices(x)
        return self._batched(self._encoder.predict_on_batch, x, batch_size, self.embedding_dim)

    def slice_stage_on_rows(self, rows: np.ndarray, neighbours: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """The slice stage of 2.5D slices given by reference: embeddings ``(B, E)``
        of a two-stage model, probabilities ``(B, 6)`` otherwise.

        ``rows`` ``(M, H, W, len(windows))`` are preprocessed slices of any mix
        of series; sample ``b`` stacks ``rows[neighbours[b, j]]`` for ``j`` in
        ``0 .. 2k`` (see :func:`ichnode.imaging.context_indices`).  The result
        equals :meth:`embed_slices` (or :meth:`predict_slices`) of the stacked
        slices, but the stacking runs inside the model, on its device: the host
        copies, and sends to a GPU, each slice of a batch once (and the few
        neighbours beyond its runs' ends) instead of ``2k + 1`` times.
        JAX compiles once per number of rows: pass the same number each time,
        e.g. a reused buffer (rows past those indexed are never read).
        """
        card = self.card
        rows = np.asarray(rows, dtype=np.float32)
        neighbours = np.asarray(neighbours, dtype=np.int32)
        span = 2 * card.context_slices + 1
        if rows.ndim != 4 or rows.shape[1:] != (*card.input_size, len(card.windows)):
            raise ValueError(
                f"rows must have shape (M, {card.input_size[0]}, {card.input_size[1]}, "
                f"{len(card.windows)}), got {rows.shape}"
            )
        if neighbours.ndim != 2 or neighbours.shape[1] != span:
            raise ValueError(f"neighbours must have shape (B, {span}), got {neighbours.shape}")
        if neighbours.size and (neighbours.min() < 0 or neighbours.max() >= len(rows)):
            raise ValueError(f"neighbours must index the {len(rows)} rows")
        if not self._pad_chunks and neighbours.size:
            # Rows past the last one indexed are never read: not worth converting
            # (under JAX they keep the shape, and so the compiled function, the same).
            rows = rows[: int(neighbours.max()) + 1]
        width = self.embedding_dim if self._encoder is not None else len(LABELS)
        return self._batched(lambda chunk: self._on_rows.predict_on_batch([rows, chunk]), neighbours, batch_size, width)

    def score_sequence(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, 6)`` for the embeddings ``(N, E)`` of ONE series in z order."""
        if self._sequence is None:
            raise TypeError(f"{self!r} has no sequence stage, use predict_slices")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have shape (N, {self.embedding_dim}), got {embeddings.shape}"
            )
        count = len(embeddings)
        if count == 0:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        length = -(-count // SEQUENCE_BUCKET) * SEQUENCE_BUCKET if self._pad_sequences else count
        padded = np.zeros((1, length, self.embedding_dim), dtype=np.float32)
        padded[0, :count] = embeddings
        mask = np.zeros((1, length), dtype=bool)
        mask[0, :count] = True
        probs = self._sequence.predict_on_batch([padded, mask])
        return np.asarray(probs, dtype=np.float32)[0, :count]

    def predict_series(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities ``(N, 6)`` for the slices ``(N, H, W, C)`` of ONE series in z order.

        Runs the slice stage in batches of ``batch_size`` and then, if the model
        has one, the sequence stage over the whole series.
        """
        x = self._check_slices(x)
        if self._sequence is None:
            return self.predict_slices(x, batch_size)
        return self.score_sequence(self.embed_slices(x, batch_size))


def _with_mirror_image(model: Any, merge: Any) -> Any:
    """``model`` on slices and on their left-right mirror images, outputs merged
    (the flip is part of the graph, so it runs where the model runs)."""
    import keras

    x = keras.Input(model.inputs[0].shape[1:])
    return keras.Model(x, merge([model(x), model(keras.ops.flip(x, axis=2))]))


def _stacking_in_graph(stage: Any, card: ModelCard) -> Any:
    """``stage`` on 2.5D slices stacked in the graph: inputs ``rows`` ``(M, H, W,
    windows)`` and ``neighbours`` ``(B, 2k + 1)``, the channel layout of
    :func:`ichnode.imaging.stack_context` (neighbour-major, window-minor)."""
    import keras

    height, width = card.input_size
    windows = len(card.windows)
    span = 2 * card.context_slices + 1
    rows = keras.Input((height, width, windows), name="rows")
    neighbours = keras.Input((span,), dtype="int32", name="neighbours")
    stacks = keras.ops.take(rows, neighbours, axis=0)  # (B, span, H, W, windows)
    x = keras.ops.reshape(keras.ops.transpose(stacks, (0, 2, 3, 1, 4)), (-1, height, width, span * windows))
    return keras.Model([rows, neighbours], stage(x))


def _masked_sequence(sequence: Any, dim: int, halves: int, honours_masks: bool) -> Any:
    """The sequence stage with a mask of the slices that exist: inputs ``(S, N,
    halves * dim)`` embeddings and ``(S, N)`` booleans. With two halves (the
    slice's and its mirror image's embeddings) it runs on each, averaged."""
    import keras

    x = keras.Input((None, halves * dim), name="embeddings")
    mask = keras.Input((None,), dtype="bool", name="mask")
    # A stage that does not honour masks is never padded: it gets no mask.
    # A functional one that does hands it to its layers (the flag keeps Keras
    # from warning, at every trace, that the stage would drop it).
    sequence.supports_masking = honours_masks
    masked = {"mask": mask} if honours_masks else {}
    if halves == 1:
        return keras.Model([x, mask], sequence(x, **masked))
    outputs = [sequence(x[..., :dim], **masked), sequence(x[..., dim:], **masked)]
    return keras.Model([x, mask], keras.layers.Average()(outputs))


def _honours_masks(model: Any) -> bool:
    """Whether padding masked out changes nothing ``model`` gives the real steps
    (a recurrent stage; not 'same'-padded convolutions, which see the padding)."""
    import keras

    return all(layer.supports_masking for layer in model.layers if not isinstance(layer, keras.layers.InputLayer))


def load_model(path: Path | None = None) -> HemorrhageModel:
    """Load a ``.keras`` model and the card beside it (``None``: the bundled default).

    ``path`` may also be a folder holding exactly one ``.keras`` file.  Raises
    :class:`ModelCardError` when the card is missing or inconsistent, and
    ``FileNotFoundError`` when the model file is missing.
    """
    import keras

    model_path = _resolve(path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    card = ModelCard.from_json(card_path_for(model_path))
    keras_model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    model = HemorrhageModel(keras_model, card, model_path)
    logger.info("loaded model %s version %s from %s", card.name, card.version, model_path)
    return model


def series_scores(slice_probs: np.ndarray, card: ModelCard) -> dict[str, float]:
    """Series-level score per label from slice probabilities ``(N, 6)``.

    ``card.series_aggregation`` says how: ``max`` over slices, ``mean``, or
    ``top3_mean`` (mean of the three highest slices, fewer if N < 3).
    """
    probs = np.asarray(slice_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(card.labels) or len(probs) == 0:
        raise ValueError(
            f"slice_probs must have shape (N >= 1, {len(card.labels)}), got {probs.shape}"
        )
    scores = aggregate_series(probs, card.series_aggregation)
    return {label: float(score) for label, score in zip(card.labels, scores)}


def aggregate_series(slice_probs: np.ndarray, how: str) -> np.ndarray:
    """Series scores ``(6,)`` from slice probabilities ``(N, 6)`` by ``how`` (see :data:`AGGREGATIONS`)."""
    probs = np.asarray(slice_probs, dtype=np.float64)
    if how == "max":
        return probs.max(axis=0)
    if how == "mean":
        return probs.mean(axis=0)
    if how == "top3_mean":
        return np.sort(probs, axis=0)[-min(3, len(probs)) :].mean(axis=0)
    raise ValueError(f"unknown series aggregation {how!r}, expected one of {AGGREGATIONS}")


def flags(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> dict[str, bool]:
    """``{label: score >= threshold}`` for every label in ``scores``."""
    missing = [label for label in scores if label not in thresholds]
    if missing:
        raise ValueError(f"thresholds has no value for {missing}")
    return {label: bool(score >= thresholds[label]) for label, score in scores.items()}
