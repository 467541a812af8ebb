"""Write a tuned model as one GGUF file (what llama.cpp, Ollama and LM Studio run), from the folded state dict.

Whatever tensors the export changed (today the up or output projections that hold the gains; any other weight edit
folded into the state dict goes the same way), the file gets them:
- a model loaded from a GGUF (the embedded SmolLM2): a copy of that file with every metadata key (architecture,
  tokenizer, chat template) carried over, unchanged tensors copied byte for byte, and each changed tensor
  re-quantised in its own type when `gguf` can quantise that type (`requantisable`), else written as Q8_0;
- a `transformers` model of the llama family or GPT-2 with a byte-level BPE tokenizer: F16 or Q8_0, through
  gguf's writer, tensor-name map and vocabulary helpers.
`check_gguf` reloads the file with `transformers`' own GGUF loader and compares every weight with the folded ones.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from ..model.loading import EMBEDDED_GGUF, embedded_dir

GGUF_TYPES = ("auto", "f16", "q8_0")  # auto: the source GGUF's own types, F16 for a transformers model
FALLBACK = QType.Q8_0  # a changed tensor whose type gguf cannot quantise
HF_ARCH = {"llama": "llama", "mistral": "llama", "gpt2": "gpt2"}  # transformers model_type -> GGUF architecture
SKIPPED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # GPT-2 keeps these as [in, out]; GGUF wants [out, in]
PRE_TOKENIZERS = {  # tokenizer.json pre_tokenizer -> llama.cpp's name for the same split (what its vocab loader reads)
    json.dumps({"type": "ByteLevel", "use_regex": True}): "gpt-2",
    json.dumps([{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]): "smollm",
}


class GGUFExportError(ValueError):
    """This model cannot be written as GGUF (yet); the message says what to do instead."""


@dataclass
class GGUFFile:
    """What was written: the file, where it came from, the tensors written anew (and their types), and notes."""

    path: Path
    source: str  # "gguf:<file>" (copied, changed tensors re-quantised) or "transformers" (converted)
    written: dict[str, str] = field(default_factory=dict)  # GGUF name -> type, of every tensor quantised anew
    changed: list[str] = field(default_factory=list)  # GGUF names of the tensors the export changed
    copied: int = 0  # tensors copied byte for byte from the source GGUF
    notes: list[str] = field(default_factory=list)
    label: str = ""  # the file's main type, for its name (Q4_1, F16, Q8_0)

    def changed_types(self) -> dict[str, int]:
        """Type -> number of changed tensors written in it."""
        counts: dict[str, int] = {}
        for n in self.changed:
            counts[self.written[n]] = counts.get(self.written[n], 0) + 1
        return counts


def requantisable(qtype: QType) -> bool:
    """Whether `gguf` can quantise this type (0.19: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4;
    not the K-quants nor the IQ types)."""
    if qtype in (QType.F32, QType.F16):
        return True
    block = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))[0]
    try:
        gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
        return True
    except (NotImplementedError, gguf.quants.QuantError, ValueError, KeyError):
        return False


def source_gguf(lm) -> Path | None:
    """The GGUF file the model was loaded from (the embedded model, or a local .gguf), or None."""
    if lm.name == "embedded" and lm.source.startswith(("gguf:", "cache:")) and (directory := embedded_dir()) is not None:
        return directory / EMBEDDED_GGUF
    if lm.source.startswith("gguf:"):
        return Path(lm.source.removeprefix("gguf:"))
    return None


def changed_tensors(lm, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of the folded state dict that differ from the loaded model's own weights."""
    base = lm.model.state_dict()
    return {k: v for k, v in state.items() if k in base and v is not base[k] and not torch.equal(v.cpu(), base[k].cpu())}


def _gguf_layout(arch: str, hf_name: str, w: np.ndarray, config) -> np.ndarray:
    """A tensor in the layout llama.cpp expects (what llama.cpp's converter does, and transformers' loader undoes)."""
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        n_head = config.num_attention_heads
        if hf_name.endswith("k_proj.weight"):
            n_head = getattr(config, "num_key_value_heads", None) or n_head
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if arch == "gpt2" and hf_name.endswith(CONV1D):
        return np.ascontiguousarray(w.T)
    return w


def _name_map(arch: str, n_blocks: int):
    arches = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arches:
        raise GGUFExportError(f"gguf {_gguf_version()} does not know the architecture {arch!r}; export --format transformers.")
    tmap = gguf.get_tensor_name_map(arches[arch], n_blocks)

    def name(hf_name: str) -> str:
        found = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GGUFExportError(f"No GGUF name for tensor {hf_name!r} of a {arch} model; export --format transformers instead.")
        return found
    return name


def _type_for(gguf_name: str, w: np.ndarray, qtype: QType) -> QType:
    """Norms, biases and position embeddings stay F32 (as llama.cpp's converter keeps them); matrices get `qtype`."""
    return QType.F32 if w.ndim < 2 or gguf_name.startswith("position_embd") else qtype


def _quantise(w: np.ndarray, qtype: QType) -> tuple[np.ndarray, QType]:
    """(data, type) for the writer: `qtype` when the rows fit its blocks, else F16 (as llama.cpp's converter does)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype in (QType.F32, QType.F16):
        return gguf.quants.quantize(w, qtype), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.ndim < 2 or w.shape[-1] % block:
        return w.astype(np.float16), QType.F16
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(lm, state: dict[str, torch.Tensor], path: str | Path, *, gguf_type: str = "auto",
               metadata: dict[str, str] | None = None) -> GGUFFile:
    """Write `state` (the folded model's state dict) as a GGUF file at `path`. `gguf_type`: "auto" (the source GGUF's
    own type for each changed tensor; F16 for a transformers model), "f16" or "q8_0" (the type of every tensor the
    export writes anew). `metadata`: extra string keys (the writer adds them under `neurontune.`)."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}.")
    path = Path(path)
    source = source_gguf(lm)
    if source is not None:
        return _rewrite(lm, state, source, path, gguf_type, metadata or {})
    return _convert(lm, state, path, gguf_type, metadata or {})


def _rewrite(lm, state, source: Path, path: Path, gguf_type: str, metadata: dict) -> GGUFFile:
    """A copy of the source GGUF with the changed tensors replaced."""
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    name = _name_map(arch, n_blocks)
    new = {name(k): _gguf_layout(arch, k, v.detach().float().cpu().numpy(), lm.model.config)
           for k, v in changed_tensors(lm, state).items()}
    tensors = {t.name: t for t in reader.tensors}
    if missing := sorted(set(new) - set(tensors)):
        raise GGUFExportError(f"The export changed {missing[:3]}, which {source.name} does not hold; export --format transformers instead.")
    writer = gguf.GGUFWriter(path, arch)
    for key, fld in reader.fields.items():  # every metadata key, as it was (the writer adds the architecture and GGUF.*)
        if key == gguf.Keys.General.ARCHITECTURE or key.startswith("GGUF.") or key.removeprefix("neurontune.") in metadata:
            continue
        kind = fld.types[0]
        writer.add_key_value(key, fld.contents(), kind, sub_type=fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for key, value in metadata.items():
        writer.add_string(f"neurontune.{key}", value)
    file_type = reader.fields.get(gguf.Keys.General.FILE_TYPE)
    label = gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_") if file_type is not None else "GGUF"
    out = GGUFFile(path, f"gguf:{source.name}", label=label)
    fallbacks: dict[str, list[str]] = {}
    for t in reader.tensors:  # file order kept
        if t.name not in new:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            out.copied += 1
            continue
        want = {"f16": QType.F16, "q8_0": QType.Q8_0}.get(gguf_type, t.tensor_type)
        if not requantisable(want):
            fallbacks.setdefault(want.name, []).append(t.name)
            want = FALLBACK
        w = new[t.name]
        if tuple(w.shape) != tuple(int(n) for n in reversed(t.shape)):
            raise GGUFExportError(f"Tensor {t.name}: the folded weights have shape {tuple(w.shape)}, the GGUF holds "
                                  f"{tuple(reversed(t.shape))}; not written.")
        data, written = _quantise(w, want)
        writer.add_tensor(t.name, data, raw_dtype=written)
        out.written[t.name] = written.name
        out.changed.append(t.name)
    for kind, names in fallbacks.items():
        out.notes.append(f"{len(names)} changed tensor(s) are {kind} in {source.name}, which gguf {_gguf_version()} cannot "
                         f"quantise: written as {FALLBACK.name} instead (llama.cpp reads mixed types).")
    _finish(writer)
    return out


def _convert(lm, state, path: Path, gguf_type: str, metadata: dict) -> GGUFFile:
    """A transformers model (llama family or GPT-2) written as F16 or Q8_0."""
    config = lm.model.config
    arch = HF_ARCH.get(config.model_type)
    if arch is None:
        raise GGUFExportError(f"GGUF export of a {config.model_type!r} model is not supported (llama, mistral and gpt2 "
                              "are); export --format transformers and convert it with llama.cpp's convert_hf_to_gguf.py.")
    qtype = QType.Q8_0 if gguf_type == "q8_0" else QType.F16
    with tempfile.TemporaryDirectory(prefix="neurontune-tok-") as tmp:
        lm.tokenizer.save_pretrained(tmp)
        tokens, types, pre, special, merges = _vocab(Path(tmp), config.vocab_size)
    writer = gguf.GGUFWriter(path, arch)
    _hparams(writer, arch, config)
    notes = [] if merges else ["The tokenizer has no BPE merges (a bare byte-level vocabulary, as the tiny test models have): "
                               "transformers loads this file, llama.cpp refuses a BPE vocabulary without merges."]
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == QType.Q8_0 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:  # transformers' GGUF tokenizer loader then rebuilds merges from scores (none for a bare byte vocabulary)
        writer.add_token_scores([0.0] * len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if lm.tokenizer.chat_template and special.chat_template is None:
        writer.add_chat_template(lm.tokenizer.chat_template)
    for key, value in metadata.items():
        writer.add_string(f"neurontune.{key}", value)
    name = _name_map(arch, config.num_hidden_layers if arch == "llama" else config.n_layer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = GGUFFile(path, "transformers", notes=notes, label=qtype.name)
    changed = set(changed_tensors(lm, state))
    for key, value in state.items():
        if key.endswith(SKIPPED) or (tied and key == "lm_head.weight"):
            continue
        gname = name(key)
        w = _gguf_layout(arch, key, value.detach().float().cpu().numpy(), config)
        data, written = _quantise(w, _type_for(gname, w, qtype))
        writer.add_tensor(gname, data, raw_dtype=written)
        out.written[gname] = written.name
        if key in changed:
            out.changed.append(gname)
    _finish(writer)
    return out


def _hparams(writer: gguf.GGUFWriter, arch: str, config) -> None:
    """The architecture's hyperparameters, as llama.cpp's converter writes them; refuses what it would need more for."""
    if arch == "llama":
        rope = getattr(config, "rope_parameters", None) or {}
        if (rope.get("rope_type") or "default") != "default":
            raise GGUFExportError("This model scales its rotary embeddings (rope_scaling), which the GGUF writer does not "
                                  "carry over yet; export --format transformers and use llama.cpp's convert_hf_to_gguf.py.")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise GGUFExportError("Llama-family models with biases are not written as GGUF yet; export --format transformers.")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        return
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GGUFExportError(f"llama.cpp's GPT-2 uses the tanh GELU; this model uses {config.activation_function!r}. "
                              "Export --format transformers instead.")
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def _vocab(folder: Path, n_vocab: int):
    """(tokens, token types, llama.cpp pre-tokeniser name, SpecialVocab) of a byte-level BPE tokenizer saved in
    `folder`, through gguf's vocabulary helpers; special tokens (ChatML's included) become control tokens."""
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise GGUFExportError("Only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style) are written as GGUF yet; this "
                              "one is not. Export --format transformers and use llama.cpp's convert_hf_to_gguf.py.") from None
    tok_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre_tok = tok_json.get("pre_tokenizer") or {}
    shape = pre_tok.get("pretokenizers", pre_tok)
    shape = [_pre_shape(p) for p in shape] if isinstance(shape, list) else _pre_shape(shape)
    pre = PRE_TOKENIZERS.get(json.dumps(shape))
    if pre is None:
        raise GGUFExportError(f"The tokenizer splits text with {json.dumps(shape)}, which has no llama.cpp pre-tokeniser "
                              "name here; export --format transformers and use llama.cpp's convert_hf_to_gguf.py.")
    specials = {t["id"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i, (text, _score, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text if isinstance(text, bytes) else str(text).encode("utf-8"))
        types.append(gguf.TokenType.CONTROL if i in specials else kind)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer: padding tokens, as the converter adds
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    merges = bool(tok_json.get("model", {}).get("merges"))  # a byte-level vocabulary may have none (the tiny models')
    return tokens, types, pre, gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab), merges


def _pre_shape(p: dict) -> dict:
    keep = {"ByteLevel": ("use_regex",), "Digits": ("individual_digits",)}.get(p.get("type"), tuple(k for k in p if k != "type"))
    return {"type": p.get("type"), **{k: p.get(k, True) for k in keep}}


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


@torch.no_grad()
def check_gguf(lm, state: dict[str, torch.Tensor], out: GGUFFile) -> dict:
    """Reload the file with `transformers`' GGUF loader (its own name map and layouts, independent of the writer's)
    and compare every weight with the folded state dict. A tensor copied from the source GGUF must come back bit for
    bit; one written anew may differ by no more than its type's own rounding of that tensor (`gguf`'s quantise /
    dequantise round trip, in the file's layout): a wrong name, transposition or permutation moves weights far more.
    Returns ({"weights_checked", "max_weight_error", "worst_tensor"}, the reloaded float32 model)."""
    from transformers import AutoModelForCausalLM

    config = lm.model.config
    # transformers' loader reads GPT-2's context and feed-forward lengths into fields GPT2Config ignores (so only the
    # standard 1024 / 4 x n_embd come back): give it the config; llama-family files are read from their metadata alone.
    given = {"config": config} if config.model_type == "gpt2" else {}
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(out.path.parent, gguf_file=out.path.name, dtype=torch.float32, **given).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise GGUFExportError(f"transformers could not load the written GGUF ({type(exc).__name__}: {str(exc)[:300]}); not saved.") from exc
    arch = HF_ARCH.get(config.model_type, config.model_type)
    name = _name_map(arch, lm.nmap.n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    mine = reloaded.state_dict()
    worst, worst_name, checked = 0.0, "", 0
    for key, value in state.items():
        if key.endswith(SKIPPED):
            continue
        if key not in mine:
            raise GGUFExportError(f"transformers reloaded the GGUF without {key}; the file is wrong, not saved.")
        got, want = mine[key].float().cpu(), value.detach().float().cpu()
        if got.shape != want.shape:
            raise GGUFExportError(f"The reloaded GGUF holds {key} with shape {tuple(got.shape)}, not {tuple(want.shape)}; not saved.")
        gname = "token_embd.weight" if tied and key == "lm_head.weight" else name(key)
        if gname in out.written:
            allowed = _rounding(arch, key, want.numpy(), QType[out.written[gname]], config)
        else:  # copied from the source: the same bytes the model was loaded from, up to the model's own dtype
            allowed = float((got - got.to(value.dtype).float()).abs().max()) if got.numel() else 0.0
        err = float((got - want).abs().max()) if got.numel() else 0.0
        if not err <= allowed * (1 + 1e-5) + 1e-7:
            raise GGUFExportError(f"The reloaded GGUF's {key} differs from the folded weights by {err:.3e} (its type "
                                  f"{out.written.get(gname, 'copied')} allows {allowed:.3e}): the file is wrong; not saved.")
        if err > worst:
            worst, worst_name = err, key
        checked += 1
    return {"weights_checked": checked, "max_weight_error": worst, "worst_tensor": worst_name}, reloaded


def _rounding(arch: str, key: str, w: np.ndarray, qtype: QType, config) -> float:
    """The largest change the writer's own quantisation to `qtype` makes to this tensor (in the file's layout)."""
    data = np.ascontiguousarray(_gguf_layout(arch, key, w, config), dtype=np.float32)
    q, used = _quantise(data, qtype)
    back = gguf.quants.dequantize(q, used).reshape(data.shape)
    return float(np.abs(back - data).max()) if data.size else 0.0
