"""Is the training input pipeline fast enough to keep the model busy?

One command::

    python benchmarks/training_pipeline.py --data DIR --config training/configs/default.yaml

(without ``--data`` a small phantom set is generated in a temporary folder).
In the same process it measures

1. the ``tf.data`` training pipeline alone (shuffle, parallel load from the
   slice cache, 2.5D stacking, augmentation, prefetch): batches/s;
2. the slice-stage train step alone, on one batch held in memory: s/step;
3. both together (``model.fit`` on the pipeline): s/step;

and prints ``ratio = pipeline batches/s x step time``; above 1 the pipeline
is not the bottleneck.  Both compete for the same CPU cores, as in training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="RSNA-layout folder (default: generate phantoms)")
    parser.add_argument("--config", type=Path, default=Path("training/configs/default.yaml"))
    parser.add_argument("--work", type=Path, help="Folder for index and cache (default: temporary)")
    parser.add_argument("--batches", type=int, default=40, help="Batches timed per measurement")
    parser.add_argument("--series", type=int, default=12, help="Phantom series when generating")
    parser.add_argument("--json", type=Path, help="Also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import keras
    import numpy as np

    from training import models
    from training.train import Run, TrainConfig

    config = TrainConfig.load(args.config)
    tmp = tempfile.TemporaryDirectory(prefix="ichnode-bench-")
    work = args.work or Path(tmp.name)
    data = args.data
    if data is None:
        from training import phantoms

        data = work / "phantoms"
        if not (data / "stage_2_train.csv").exists():
            phantoms.write_dataset(data, args.series, seed=7, layout="rsna", matrix=256)
    run = Run(data, config, work / "run", "benchmark", progress=False)
    run.prepare_data()
    batch = config.slice_stage.batch_size
    keras.utils.set_random_seed(config.seed)

    # 1. pipeline alone
    ds = run.dataset("train", training=True, repeat=True, batch_size=batch)
    it = iter(ds)
    for _ in range(3):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        x, y = next(it)
    pipeline_bps = args.batches / (time.perf_counter() - t0)

    # 2. train step alone on an in-memory batch
    encoder = models.build_slice_encoder((*config.input.size, config.channels), config.arch)
    model = models.build_slice_model(encoder, models.build_slice_head())
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=models.WeightedBinaryCrossentropy())
    x, y = np.asarray(x), np.asarray(y)
    for _ in range(3):
        model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        model.train_on_batch(x, y)
    step_s = (time.perf_counter() - t0) / args.batches

    # 3. together (a first short fit compiles the train function)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=args.batches, epochs=1, verbose=0, shuffle=False)
    fit_step_s = (time.perf_counter() - t0) / args.batches

    result = {
        "batch_size": batch,
        "input": [*config.input.size, config.channels],
        "cache": bool(config.data.cache),
        "pipeline_batches_per_s": pipeline_bps,
        "train_step_s": step_s,
        "train_steps_per_s": 1.0 / step_s,
        "fit_step_s": fit_step_s,
        "ratio_pipeline_over_model": pipeline_bps * step_s,
    }
    print(
        f"pipeline: {pipeline_bps:.1f} batches/s ({pipeline_bps * batch:.0f} slices/s) | "
        f"train step: {step_s * 1000:.1f} ms ({1 / step_s:.1f} steps/s) | "
        f"fit on pipeline: {fit_step_s * 1000:.1f} ms/step"
    )
    verdict = "pipeline is NOT the bottleneck" if result["ratio_pipeline_over_model"] > 1 else "pipeline IS the bottleneck"
    print(f"ratio (pipeline batches/s x step time) = {result['ratio_pipeline_over_model']:.2f}: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
