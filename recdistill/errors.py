"""Errors that are not a bad input (those are ValueErrors) but that the CLI still reports as
one clear line. Kept free of heavy imports: the CLI catches them before torch is loaded."""


class TrainingDiverged(RuntimeError):
    """A stage's loss or gradients stopped being finite; its weights were not stepped."""
