"""Model definitions: a 2.5D slice CNN and a sequence stage over a series.

Only built-in Keras layers are used, so saved models load in the node
(``ichnode.model``) on any backend without custom objects.  The layout of the
assembled model (names ``slice_encoder``, ``slice_head``, ``sequence_head``)
is the contract documented in :mod:`ichnode.model`.

- :func:`build_slice_encoder`: ``(H, W, C) -> (E,)`` embedding; either a
  compact custom CNN (sizes configurable) or a ``keras.applications`` backbone
  built with ``weights=None`` or a local weights file (never downloaded).
- :func:`build_slice_head`: ``Dense(6, sigmoid)`` on the embedding.
- :func:`build_sequence_head`: ``(N, E) -> (N, 6)`` over the slices of one
  series in z order, a bidirectional GRU or 1-D convolutions, with a skip
  from each slice's own embedding so it starts near the slice-only scores.
- :func:`assemble`: the two-stage model saved for the node.

:class:`ArchitectureConfig` holds the sizes and round-trips through
``get_config()`` / ``from_config()`` (stored in the model card).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras

from ichnode.config import LABELS
from ichnode.model import SEQUENCE_HEAD, SLICE_ENCODER, SLICE_HEAD

N_LABELS = len(LABELS)
# The competition weights: 2 for "any", 1 for each subtype.
LABEL_WEIGHTS = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes of the two stages; tiny values give models that train in seconds."""

    backbone: str = "compact"  # "compact" or a keras.applications name, e.g. "EfficientNetB0"
    backbone_weights: str | None = None  # None or a LOCAL weights file; never downloaded
    filters: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: int = 1
    stem_pool: bool = False  # 2x2 max-pool after the stride-2 stem: full-resolution input at low cost
    embedding_dim: int = 64
    dropout: float = 0.2
    sequence: str = "gru"  # "gru", "conv" or "none"
    sequence_units: int = 32
    sequence_layers: int = 1
    sequence_kernel: int = 5
    sequence_dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        if self.backbone != "compact" and not hasattr(keras.applications, self.backbone):
            raise ValueError(
                f"backbone must be 'compact' or a keras.applications model, got {self.backbone!r}"
            )
        if self.sequence not in ("gru", "conv", "none"):
            raise ValueError(f"sequence must be 'gru', 'conv' or 'none', got {self.sequence!r}")
        if not self.filters or min(self.filters) < 1:
            raise ValueError(f"filters must be positive integers, got {self.filters}")
        for name in ("convs_per_stage", "embedding_dim", "sequence_units", "sequence_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_kernel < 1 or self.sequence_kernel % 2 == 0:
            raise ValueError(f"sequence_kernel must be odd and >= 1, got {self.sequence_kernel}")
        for name in ("dropout", "sequence_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def get_config(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["filters"] = list(self.filters)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ArchitectureConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}, expected {sorted(known)}")
        return cls(**config)


def _conv_bn_relu(x: Any, filters: int, strides: int, name: str) -> Any:
    x = keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_slice_encoder(
    input_shape: tuple[int, int, int], config: ArchitectureConfig = ArchitectureConfig()
) -> keras.Model:
    """The per-slice CNN ``(H, W, C) -> (embedding_dim,)``, named ``slice_encoder``.

    The compact CNN: a stride-2 stem (optionally followed by 2x2 max-pooling,
    which keeps small bright lesions of a full-resolution input), then one stage per entry of ``filters``
    (``convs_per_stage`` conv-BN-ReLU, then 2x2 max-pooling), then global
    average and max pooling (max keeps small bleeds visible), a dense
    embedding and dropout.
    """
    inputs = keras.Input(input_shape, name="slice")
    if config.backbone == "compact":
        x = _conv_bn_relu(inputs, config.filters[0], 2, "stem")
        if config.stem_pool:
            x = keras.layers.MaxPooling2D(2, name="stem_pool")(x)
        for stage, filters in enumerate(config.filters):
            for i in range(config.convs_per_stage):
                x = _conv_bn_relu(x, filters, 1, f"stage{stage}_{i}")
            x = keras.layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    else:
        backbone = getattr(keras.applications, config.backbone)(
            include_top=False, weights=None, input_shape=input_shape
        )
        if config.backbone_weights:
            backbone.load_weights(config.backbone_weights)
        x = backbone(inputs)
    x = keras.layers.Concatenate(name="pool")(
        [
            keras.layers.GlobalAveragePooling2D(name="avg_pool")(x),
            keras.layers.GlobalMaxPooling2D(name="max_pool")(x),
        ]
    )
    x = keras.layers.Dense(config.embedding_dim, activation="relu", name="embedding")(x)
    x = keras.layers.Dropout(config.dropout, name="embedding_dropout")(x)
    return keras.Model(inputs, x, name=SLICE_ENCODER)


def build_slice_head() -> keras.layers.Layer:
    """Slice-only probabilities from an embedding, named ``slice_head``."""
    return keras.layers.Dense(N_LABELS, activation="sigmoid", name=SLICE_HEAD)


def build_slice_model(encoder: keras.Model, head: keras.layers.Layer) -> keras.Model:
    """Encoder + head, ``(H, W, C) -> (6,)``: what stage 1 trains."""
    inputs = keras.Input(encoder.inputs[0].shape[1:], name="slice")
    return keras.Model(inputs, head(encoder(inputs)), name="slice_model")


def build_sequence_head(
    embedding_dim: int, config: ArchitectureConfig = ArchitectureConfig()
) -> keras.Model:
    """``(N, E) -> (N, 6)`` over the slices of a series, named ``sequence_head``.

    The context features (bidirectional GRU, or 'same'-padded 1-D convolutions)
    are concatenated with each slice's own embedding before the output layer.
    """
    inputs = keras.Input((None, embedding_dim), name="embeddings")
    x = keras.layers.Dropout(config.sequence_dropout, name="seq_dropout")(inputs)
    for i in range(config.sequence_layers):
        if config.sequence == "gru":
            x = keras.layers.Bidirectional(
                keras.layers.GRU(config.sequence_units, return_sequences=True),
                name=f"seq_bigru{i}",
            )(x)
        else:
            x = keras.layers.Conv1D(
                config.sequence_units,
                config.sequence_kernel,
                padding="same",
                activation="relu",
                name=f"seq_conv{i}",
            )(x)
    x = keras.layers.Concatenate(name="seq_skip")([inputs, x])
    outputs = keras.layers.Dense(N_LABELS, activation="sigmoid", name="seq_probs")(x)
    return keras.Model(inputs, outputs, name=SEQUENCE_HEAD)


def assemble(
    encoder: keras.Model, head: keras.layers.Layer, sequence: keras.Model | None
) -> keras.Model:
    """The model the node loads (layout in :mod:`ichnode.model`).

    With a sequence stage: ``(S, N, H, W, C) -> {"probs", "slice_probs"}``
    (each ``(S, N, 6)``).  Without: the slice model ``(B, H, W, C) -> (B, 6)``.
    """
    if sequence is None:
        return build_slice_model(encoder, head)
    inputs = keras.Input((None, *encoder.inputs[0].shape[1:]), name="series")
    embeddings = keras.layers.TimeDistributed(encoder, name="per_slice")(inputs)
    return keras.Model(
        inputs,
        {"probs": sequence(embeddings), "slice_probs": head(embeddings)},
        name="ich_net",
    )


@keras.saving.register_keras_serializable(package="ichnode_training")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Per-sample weighted mean over labels of the binary cross-entropy.

    With the default weights (2 for ``any``, 1 per subtype) this is the RSNA
    2019 competition metric for one sample; probabilities are clipped to
    ``[eps, 1 - eps]``.
    """

    def __init__(
        self,
        label_weights: tuple[float, ...] = LABEL_WEIGHTS,
        epsilon: float = 1e-7,
        name: str = "weighted_bce",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.label_weights = tuple(float(w) for w in label_weights)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        y_true = ops.cast(y_true, y_pred.dtype)
        p = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        bce = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
        w = ops.convert_to_tensor(self.label_weights, dtype=y_pred.dtype)
        return ops.sum(bce * w, axis=-1) / ops.sum(w)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "label_weights": list(self.label_weights),
            "epsilon": self.epsilon,
        }


def distribution_strategy() -> Any:
    """``MirroredStrategy`` over several GPUs, else the default strategy."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


__all__ = [
    "LABEL_WEIGHTS",
    "ArchitectureConfig",
    "WeightedBinaryCrossentropy",
    "assemble",
    "build_sequence_head",
    "build_slice_encoder",
    "build_slice_head",
    "build_slice_model",
    "distribution_strategy",
]
