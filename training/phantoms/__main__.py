"""``python -m training.phantoms --out DIR --series N --seed S ...``: see :mod:`training.phantoms.cli`."""

from training.phantoms.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
