"""The zoo presets by name: where each lives by default and how to build it."""

from __future__ import annotations

from pathlib import Path

from evomerge.fitness.smollm2 import SMOL_TINY, SmolRecipe, build_smollm2_zoo, default_smollm2_dir
from evomerge.fitness.zoo import TINY, ZooRecipe, default_zoo_dir, ensure_zoo, zoo_is_current

PRESETS = ("demo", "smollm2")


def preset_dir(preset: str) -> Path:
    """Where a zoo preset lives by default (the per-user cache)."""
    return default_smollm2_dir() if preset == "smollm2" else default_zoo_dir()


def ensure_preset(
    preset: str, root: Path | None = None, *, seed: int = 0, tiny: bool = False, force: bool = False, log=print
) -> Path:
    """Build the zoo ``preset`` (``demo`` or ``smollm2``; ``tiny``: the tests' small recipe) at
    ``root`` unless it is there and built from the same recipe."""
    root = (root or preset_dir(preset)).resolve()
    if preset == "smollm2":
        smol = (SMOL_TINY if tiny else SmolRecipe()).model_copy(update={"seed": seed})
        if force or not zoo_is_current(root, smol):
            build_smollm2_zoo(root, smol, log=log)
        return root
    return ensure_zoo(root, (TINY if tiny else ZooRecipe()).model_copy(update={"seed": seed}), force=force, log=log)
