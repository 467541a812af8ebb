"""Checks before a model's weights are read: is it there, may its code run, is its architecture supported,
and do its weights fit in the memory of the device they load to. Each refusal says what to do instead."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .errors import HINT, ModelLoadError, UnsupportedModelError
from .neuron_map import check_supported, supported_types

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "NEURONTUNE_MEMORY_LIMIT"  # e.g. "16GB": the memory to assume free ("off": no check)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB" if n >= 2**16 else f"{int(n):,} bytes"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def parse_size(text: str | int) -> int:
    """'16GB', '512MiB', '1e9' or a plain number of bytes (GB = GiB = 2**30)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    try:
        if m is None:
            raise ValueError(text)
        return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
    except ValueError:
        raise ModelLoadError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size; write e.g. 16GB, 512MB, a number of bytes, or 'off'.") from None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def available_memory(device: str | None = None, limit: int | str | None = None) -> tuple[int | None, str]:
    """Bytes free for the weights on `device` and where the figure comes from (None: unknown, no check).

    `limit` or $NEURONTUNE_MEMORY_LIMIT replace the measurement ("off" turns the check off). CPU: the lower of
    /proc/meminfo's MemAvailable and the cgroup (container) limit minus its usage; CUDA: torch.cuda.mem_get_info."""
    override = limit if limit is not None else os.environ.get(MEMORY_LIMIT_ENV, "").strip() or None
    if override is not None:
        if str(override).lower() in ("off", "none", "no"):
            return None, "check off"
        return parse_size(override), f"the limit {MEMORY_LIMIT_ENV}={override}"
    dev = str(device or "cpu")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            return None, ""
        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free), f"{dev} (free GPU memory)"
    if not dev.startswith("cpu"):
        return None, ""  # mps, xpu ...: no portable figure
    figures = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    figures.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit_file), _read_int(usage_file)
        if cap is not None and used is not None and cap < 2**60:
            figures.append(max(cap - used, 0))
            break
    return (min(figures), "this machine (available RAM)") if figures else (None, "")


def config_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    d = getattr(torch, d, None) if isinstance(d, str) else d
    return d if isinstance(d, torch.dtype) else torch.float32


def count_parameters(config, directory: Path | None = None, trust_remote_code: bool = False) -> int | None:
    """Parameters of the model a config describes, built on the meta device (no memory); falls back to the
    weight files' sizes in a local directory. None when neither works."""
    try:
        with torch.device("meta"):
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return int(sum(p.numel() for p in empty.parameters()))
    except Exception as exc:  # noqa: BLE001 - an estimate only: fall back, never fail the load here
        log.info("Could not size %s from its config (%s); using its weight files.", type(config).__name__, exc)
    if directory is not None and directory.is_dir():
        files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files) // config_dtype(config).itemsize
    return None


def check_memory(name: str, n_params: int | None, dtype: torch.dtype, device: str | None = None,
                 limit: int | str | None = None) -> None:
    """Refuse a model whose weights would not fit (rather than be killed by the OOM killer mid-load)."""
    available, where = available_memory(device, limit)
    if available is None or not n_params:
        return
    need = n_params * dtype.itemsize
    if need > 0.9 * available:  # keep a tenth for activations, the tokenizer and the rest of the process
        cheaper = " Use --dtype bfloat16 (half of float32)," if dtype.itemsize > 2 else " Use"
        raise ModelLoadError(
            f"Could not load model '{name}': it is too large for the memory available. Its {_count(n_params)} parameters "
            f"need about {_gib(need)} in {str(dtype).removeprefix('torch.')}, and {where} has {_gib(available)} free."
            f"{cheaper} a smaller model, a device with more memory (--device cuda) or --device-map auto (offloads layers); "
            f"to skip this check set {MEMORY_LIMIT_ENV} to the memory to assume (e.g. 64GB) or 'off'.")


def _offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.is_offline_mode())
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    """'./m', '/abs/m', '~/m', 'a/b/c' or 'C:\\m' are paths; 'owner/name' and 'gpt2' may be hub ids."""
    return name.startswith((".", "/", "~", "\\")) or "\\" in name or name.count("/") > 1 or bool(re.match(r"^[A-Za-z]:", name))


def _not_found(name: str, exc: Exception) -> ModelLoadError:
    tail = f"{HINT}. Supported families: {', '.join(supported_types())}."
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelLoadError(f"Could not load model '{name}': {path} holds no config.json. Point at the folder that holds "
                              f"config.json and the weights (what save_pretrained writes). {tail}")
    if path.exists() or _looks_like_path(name):
        return ModelLoadError(f"Could not load model '{name}': there is no model directory at {path.resolve()}. "
                              f"Check the path. {tail}")
    if _offline():
        return ModelLoadError(f"Could not load model '{name}': it is not a local directory and not in the Hugging Face cache, "
                              f"and the hub is off (HF_HUB_OFFLINE=1). Download it once while online (`hf download {name}`), "
                              f"unset HF_HUB_OFFLINE, or give a local directory. {tail}")
    return ModelLoadError(f"Could not load model '{name}': {exc}\n{tail}")


def inspect_config(name: str, trust_remote_code: bool = False, **kwargs):
    """Read a local or hub model's config and refuse what cannot work, before any weight is read: a missing
    model, custom code while trust_remote_code is off, mixture-of-experts and unmapped architectures."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file() and not kwargs.get("gguf_file"):
        raise _not_found(name, FileNotFoundError(name))
    try:
        raw, _ = PretrainedConfig.get_config_dict(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_found(name, exc) from exc
    model_type = raw.get("model_type")
    if not model_type and not kwargs.get("gguf_file"):
        raise ModelLoadError(f"Could not load model '{name}': its config.json names no model_type. Use a folder written by "
                             "transformers' save_pretrained (or add the model_type of its architecture, e.g. \"llama\").")
    custom = "auto_map" in raw and model_type not in CONFIG_MAPPING
    if custom and not trust_remote_code:
        classes = ", ".join(sorted(set(raw["auto_map"].values()) if isinstance(raw["auto_map"], dict) else []))[:160]
        raise ModelLoadError(
            f"Could not load model '{name}': its architecture '{model_type}' comes with its own Python code ({classes}), "
            "which runs on this machine and is off by default. Pass --trust-remote-code (studio: tick trust_remote_code) "
            "if you trust this repository.")
    try:
        if not custom:
            check_supported(model_type, raw.get("num_local_experts") or raw.get("num_experts"))
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
        check_supported(config.model_type, getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"Could not load model '{name}': {exc}") from exc
    return config


def gguf_parameters(path: Path) -> int | None:
    """Parameters in a GGUF file (from its tensor table; nothing is dequantised)."""
    try:
        from gguf import GGUFReader
        return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors))
    except Exception:  # noqa: BLE001 - an estimate only
        return None
