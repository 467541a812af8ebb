"""The package's metadata says the truth: the wheel carries every data file the engine reads, every third-party
import is a declared dependency, the tested pins sit inside the declared ranges, and the console scripts exist.
(`.ci/wheel_smoke.sh`, run by `make test`, builds and installs the wheel and runs it from outside the checkout.)"""
from __future__ import annotations

import ast
import importlib
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from neurontune.infra import resources

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
TRANSITIVE = {  # imported directly, installed by a declared dependency
    "huggingface_hub": "transformers", "tokenizers": "transformers", "packaging": "transformers",
    "spaces": "only on a Hugging Face Space (a guarded import)",
}
IMPORT_NAMES = {"gradio_client": "gradio_client"}


def _declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name.lower().replace("-", "_"): r for r in reqs if r.name != "neurontune"}


def test_the_wheel_carries_what_the_engine_reads():
    """Every prompt set, template and target file of assets/ (not the judge's labels or screenshots, which only
    tests and docs read), the shipped run and the presets are mapped into the package."""
    mapped = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    data = {f"assets/{p.name}" for p in (ROOT / "assets").iterdir()
            if p.suffix in (".csv", ".json", ".jsonl") and not p.name.startswith("judge_labels")}
    assert data <= set(mapped), f"not in the wheel: {sorted(data - set(mapped))}"
    assert {"assets/default_run", "presets"} <= set(mapped)
    for source, target in mapped.items():
        assert (ROOT / source).exists(), source
        assert target == "neurontune/" + source, (source, target)  # resources.py finds them there
    assert resources.assets_dir() == ROOT / "assets" and resources.presets_dir() == ROOT / "presets"  # a checkout
    assert (resources.shipped_run_dir() / "modulation.safetensors").is_file()


def test_every_third_party_import_is_declared():
    declared = _declared()
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for path in (ROOT / "neurontune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "neurontune" or top in TRANSITIVE:
                    continue
                if IMPORT_NAMES.get(top, top).lower() not in declared:
                    missing.setdefault(top, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_tested_pins_sit_inside_the_declared_ranges():
    declared = _declared()
    pins = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for pin in pins:
        req = declared.get(pin.name.lower().replace("-", "_"))
        assert req is not None, f"{pin.name} is pinned in requirements.txt but not declared in pyproject.toml"
        (version,) = [s.version for s in pin.specifier]
        assert req.specifier.contains(version), f"requirements.txt pins {pin}, outside pyproject's {req}"
    assert Requirement(next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))).specifier.contains("2.13.0")


def test_console_scripts_exist():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["neurontune"] == "neurontune.cli:main"  # the same as `python -m neurontune`
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
