"""ichnode.model: the model card, the loader's refusals, batched prediction, the bundled default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ichnode.config import LABELS
from ichnode.imaging import context_indices, stack_context
from ichnode.model import (
    SEQUENCE_BUCKET,
    HemorrhageModel,
    ModelCard,
    ModelCardError,
    _honours_masks,
    card_path_for,
    default_model_path,
    flags,
    load_model,
    series_scores,
)

# Keras' TensorFlow backend calls np.array(variable) on save; numpy 2 warns about it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


def card_dict(**overrides) -> dict:
    card = {
        "name": "tiny",
        "version": "0.0.1",
        "labels": list(LABELS),
        "input_size": [32, 32],
        "windows": [list(w) for w in WINDOWS],
        "context_slices": 1,
        "channels": 9,
        "sequence_stage": True,
        "series_aggregation": "max",
        "thresholds": {label: 0.5 for label in LABELS},
        "trained_on": "nothing (random weights)",
        "intended_use": "tests",
        "disclaimer": "Not for clinical use.",
        "command": "pytest",
        "seed": 0,
    }
    card.update(overrides)
    return card


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> Path:
    """An untrained two-stage model, 32x32x9, saved with its card."""
    import keras

    from training import models

    keras.utils.set_random_seed(0)
    config = models.ArchitectureConfig(filters=(4, 8), embedding_dim=8, sequence_units=4)
    encoder = models.build_slice_encoder((32, 32, 9), config)
    model = models.assemble(encoder, models.build_slice_head(), models.build_sequence_head(8, config))
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    card_path_for(path).write_text(json.dumps(card_dict()))
    return path


def with_card(tiny_model_path: Path, tmp_path: Path, card: dict | None) -> Path:
    path = tmp_path / "m.keras"
    path.write_bytes(tiny_model_path.read_bytes())
    if card is not None:
        card_path_for(path).write_text(json.dumps(card))
    return path


# -- the card on its own -------------------------------------------------------


def test_card_round_trip(tmp_path):
    card = ModelCard.model_validate(card_dict())
    card.to_json(tmp_path / "c.json")
    assert ModelCard.from_json(tmp_path / "c.json") == card
    assert card.input_shape == (32, 32, 9)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"labels": list(reversed(LABELS))}, "labels"),
        ({"labels": list(LABELS[:5])}, "labels"),
        ({"channels": 3}, "channels"),
        ({"context_slices": 2}, "channels"),
        ({"thresholds": {label: 0.5 for label in LABELS[:5]}}, "thresholds"),
        ({"thresholds": {**{label: 0.5 for label in LABELS}, "any": 1.5}}, "thresholds"),
        ({"windows": [[40, 0]]}, "windows"),
        ({"series_aggregation": "median"}, "series_aggregation"),
        ({"disclaimer": ""}, "disclaimer"),
        ({"surprise": 1}, "surprise"),
        # Past what a result row holds: no result of the model could be recorded.
        ({"version": "2026.11.28-finetune-siteA-head-ct-thin-slices-ablation-run17-seed3"}, "version"),
        ({"name": "n" * 129}, "name"),
    ],
)
def test_invalid_card_names_the_field(tmp_path, overrides, field):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(card_dict(**overrides)))
    with pytest.raises(ModelCardError, match=field):
        ModelCard.from_json(path)


def test_card_missing_field_is_named(tmp_path):
    data = card_dict()
    del data["seed"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="'seed'"):
        ModelCard.from_json(path)


# -- the loader refuses -------------------------------------------------------------


def test_loader_refuses_missing_card(tiny_model_path, tmp_path):
    with pytest.raises(ModelCardError, match="missing"):
        load_model(with_card(tiny_model_path, tmp_path, None))


def test_loader_refuses_unreadable_card(tiny_model_path, tmp_path):
    path = with_card(tiny_model_path, tmp_path, None)
    card_path_for(path).write_text("{not json")
    with pytest.raises(ModelCardError, match="unreadable"):
        load_model(path)


def test_loader_refuses_card_that_does_not_fit_the_model(tiny_model_path, tmp_path):
    wrong_size = card_dict(input_size=[64, 64])
    with pytest.raises(ModelCardError, match="input_size"):
        load_model(with_card(tiny_model_path, tmp_path, wrong_size))
    wrong_channels = card_dict(windows=[[40, 80]], channels=3)
    with pytest.raises(ModelCardError, match="channels"):
        load_model(with_card(tiny_model_path, tmp_path, wrong_channels))
    no_sequence = card_dict(sequence_stage=False)
    with pytest.raises(ModelCardError, match="sequence_stage"):
        load_model(with_card(tiny_model_path, tmp_path, no_sequence))


def test_loader_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing.keras")


# -- prediction ---------------------------------------------------------------------


def test_prediction_api(tiny_model_path):
    model = load_model(tiny_model_path)
    assert isinstance(model, HemorrhageModel) and model.has_sequence_stage
    x = np.random.default_rng(0).random((37, 32, 32, 9), dtype=np.float32)
    probs = model.predict_series(x, batch_size=8)
    assert probs.shape == (37, 6) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    # the two-stage contract: CNN stage batched across anything, sequence per series
    emb = np.concatenate([model.embed_slices(x[:20], batch_size=16), model.embed_slices(x[20:])])
    assert emb.shape == (37, model.embedding_dim)
    np.testing.assert_allclose(model.score_sequence(emb), probs, rtol=1e-5, atol=1e-6)
    # the assembled Keras model gives the same numbers
    full = model.keras_model.predict_on_batch(x[None])
    np.testing.assert_allclose(full["probs"][0], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["slice_probs"][0], model.predict_slices(x), rtol=1e-5, atol=1e-6)
    # batch size does not change results
    np.testing.assert_allclose(model.predict_series(x, batch_size=32), probs, rtol=1e-5, atol=1e-6)


def test_padded_last_chunk_gives_the_same_scores(tiny_model_path):
    # What the JAX backend does so that one compiled shape serves every batch.
    model = load_model(tiny_model_path)
    x = np.random.default_rng(1).random((21, 32, 32, 9), dtype=np.float32)
    plain = model.predict_series(x, batch_size=8)
    model._pad_chunks = model._pad_sequences = True
    seen, lengths = [], []
    encoder, sequence = model._encoder.predict_on_batch, model._sequence.predict_on_batch
    model._encoder.predict_on_batch = lambda chunk: seen.append(len(chunk)) or encoder(chunk)
    model._sequence.predict_on_batch = lambda inputs: lengths.append(inputs[0].shape[1]) or sequence(inputs)
    np.testing.assert_allclose(model.predict_series(x, batch_size=8), plain, rtol=1e-5, atol=1e-6)
    assert seen == [8, 8, 8]
    assert lengths == [SEQUENCE_BUCKET]  # 21 slices, padded and masked out


def test_only_a_sequence_stage_that_honours_masks_is_padded():
    from training import models

    assert _honours_masks(models.build_sequence_head(8, models.ArchitectureConfig(sequence="gru")))
    # 'same'-padded convolutions see the padding: such a stage compiles per length instead
    assert not _honours_masks(models.build_sequence_head(8, models.ArchitectureConfig(sequence="conv")))


def test_test_time_flip_averages_the_mirror_image(tiny_model_path, tmp_path):
    plain = load_model(tiny_model_path)
    flipped = load_model(with_card(tiny_model_path, tmp_path, card_dict(test_time_flip=True)))
    x = np.random.default_rng(2).random((13, 32, 32, 9), dtype=np.float32)
    mirror = np.ascontiguousarray(x[:, :, ::-1])
    expected = (plain.predict_series(x) + plain.predict_series(mirror)) / 2
    np.testing.assert_allclose(flipped.predict_series(x, batch_size=4), expected, rtol=1e-5, atol=1e-6)
    expected_slices = (plain.predict_slices(x) + plain.predict_slices(mirror)) / 2
    np.testing.assert_allclose(flipped.predict_slices(x), expected_slices, rtol=1e-5, atol=1e-6)
    # the worker's path: embeddings batched across series, then the sequence stage per series
    emb = flipped.embed_slices(x)
    assert emb.shape == (13, 2 * plain.embedding_dim)
    np.testing.assert_allclose(flipped.score_sequence(emb), expected, rtol=1e-5, atol=1e-6)
    flipped._pad_sequences = True  # as under JAX: both halves see the mask
    np.testing.assert_allclose(flipped.score_sequence(emb), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("test_time_flip", [False, True])
def test_slices_stacked_by_the_model_score_as_slices_stacked_on_the_host(tiny_model_path, tmp_path, test_time_flip):
    model = load_model(with_card(tiny_model_path, tmp_path, card_dict(test_time_flip=test_time_flip)))
    rng = np.random.default_rng(3)
    # two series' slices side by side, as the worker packs one batch: series a
    # from its first slice, series b from its middle (neighbours beyond both ends)
    a, b = rng.random((5, 32, 32, 3), dtype=np.float32), rng.random((9, 32, 32, 3), dtype=np.float32)
    rows = np.concatenate([a, b[2:8]])
    neighbours = np.concatenate([context_indices(5, 1), context_indices(9, 1, range(3, 7)) - 2 + 5])
    host = np.concatenate([stack_context(a, 1), stack_context(b, 1, rows=range(3, 7))])
    np.testing.assert_array_equal(rows[neighbours[6]].transpose(1, 2, 0, 3).reshape(32, 32, 9), host[6])
    expected = model.embed_slices(host)
    np.testing.assert_allclose(model.slice_stage_on_rows(rows, neighbours, 4), expected, rtol=1e-5, atol=1e-6)
    # JAX's padding of the last chunk to the batch size
    model._pad_chunks = True
    np.testing.assert_allclose(model.slice_stage_on_rows(rows, neighbours, 4), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="neighbours must index"):
        model.slice_stage_on_rows(rows[:3], neighbours)
    with pytest.raises(ValueError, match="rows must have shape"):
        model.slice_stage_on_rows(host, neighbours)


def test_prediction_checks_its_input(tiny_model_path):
    model = load_model(tiny_model_path)
    with pytest.raises(ValueError, match="x must have shape"):
        model.predict_slices(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        model.score_sequence(np.zeros((4, 3), np.float32))
    assert model.score_sequence(np.zeros((0, model.embedding_dim))).shape == (0, 6)


def test_series_scores_and_flags():
    card = ModelCard.model_validate(card_dict())
    probs = np.array([[0.1, 0.0, 0.2, 0.0, 0.0, 0.9], [0.7, 0.0, 0.1, 0.0, 0.3, 0.1]])
    scores = series_scores(probs, card)
    assert list(scores) == list(LABELS)
    assert scores["any"] == pytest.approx(0.7) and scores["subdural"] == pytest.approx(0.9)
    mean_card = ModelCard.model_validate(card_dict(series_aggregation="mean"))
    assert series_scores(probs, mean_card)["any"] == pytest.approx(0.4)
    found = flags(scores, card.thresholds)
    assert found == {"any": True, "epidural": False, "intraparenchymal": False,
                     "intraventricular": False, "subarachnoid": False, "subdural": True}
    with pytest.raises(ValueError, match="no value"):
        flags(scores, {"any": 0.5})
    with pytest.raises(ValueError, match="slice_probs"):
        series_scores(np.zeros((0, 6)), card)


# -- the bundled default model ------------------------------------------------------


def test_default_model_loads_with_declared_input_shape():
    path = default_model_path()
    assert path.is_file(), f"the bundled default model {path} is missing"
    assert path.stat().st_size < 20e6
    model = load_model(None)
    card = model.card
    assert card.labels == LABELS
    assert card.input_shape == (*card.input_size, len(card.windows) * (2 * card.context_slices + 1))
    encoder_input = model.keras_model.inputs[0].shape[-3:]
    assert tuple(encoder_input) == card.input_shape
    assert "phantom" in card.trained_on.lower()
    assert "not for clinical use" in card.disclaimer.lower()
    assert card.command.startswith("python -m training.train")
    x = np.random.default_rng(1).random((24, *card.input_shape), dtype=np.float32)
    probs = model.predict_series(x)
    assert probs.shape == (24, 6) and np.all(np.isfinite(probs))
