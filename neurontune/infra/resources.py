"""Where the data the engine reads at run time lives: the prompt sets and templates (`assets/`), the shipped run
(`assets/default_run/`) and the presets (`presets/`).

In a checkout they are folders beside the package; in an installed wheel `pyproject.toml` maps them into the
package (`neurontune/assets`, `neurontune/presets`). These functions are the one place that knows both.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root, when the package runs from a checkout


def _folder(name: str) -> Path:
    packaged = resources.files("neurontune") / name
    if isinstance(packaged, Path) and packaged.is_dir():  # an installed wheel: data inside the package
        return packaged
    return CHECKOUT / name


def assets_dir() -> Path:
    """The prompt sets, attack templates and refusal targets (`assets/`)."""
    return _folder("assets")


def presets_dir() -> Path:
    """The built-in presets (`presets/*.json`)."""
    return _folder("presets")


def shipped_run_dir() -> Path:
    """The run the studio opens on (`assets/default_run/`, made by `python -m neurontune snapshot`)."""
    return assets_dir() / "default_run"
