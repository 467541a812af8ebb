"""One key-value group of an attention layer rewritten to write the running mean of a probe over every token so far:
a whole-prompt reading made of the model's own weights, for the folded switch (`switch.Switch.mean`) to read.

In a LLaMA-family attention layer, query heads share key-value heads in groups (grouped-query attention; a group of one
without it). With the query rows of one group's heads zeroed, every score is 0, so each of those heads attends alike to
every token so far (the causal mask and the padding still apply) and outputs the running mean of its values. The group's
value rows become one row `value_row` (a probe of the layer's normalised input, a constant folded in) and zeros, and its
heads' output columns one column `out_col` and zeros, so the layer adds mean_{s<=t}(value_row . x_s) * out_col at token
t and nothing else from that group. Only query rows, value rows and output columns change: same architecture and config.
The group's key rows stay as they are (no query reads them). Its cost is that group's own work (about 1.03 in
perplexity for the embedded model's cheapest group of layer 15, docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.neuron_map import decoder_layers
from .hooks import delta_hook

NAMES = ("switch.mean.where", "switch.mean.value_row", "switch.mean.out_col")  # its tensors in a modulation file


@dataclass
class TurnMean:
    """Key-value group `group` of layer `layer`'s attention, rewritten: its values carry `value_row . x`, its heads
    write the running mean of that along `out_col` ([d_model] each)."""

    layer: int
    group: int
    value_row: torch.Tensor
    out_col: torch.Tensor

    def __post_init__(self):
        if self.value_row.dim() != 1 or self.value_row.shape != self.out_col.shape:
            raise ValueError(f"A turn mean needs a value row and an output column of one shape [d_model]; got "
                             f"{tuple(self.value_row.shape)} and {tuple(self.out_col.shape)}.")
        if not (bool(torch.isfinite(self.value_row).all()) and bool(torch.isfinite(self.out_col).all())):
            raise ValueError("A turn mean's value row and output column must be finite.")
        if self.layer < 0 or self.group < 0:
            raise ValueError(f"A turn mean's layer and group must be 0 or more, not {self.layer} and {self.group}.")

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(NAMES, (torch.tensor([self.layer, self.group], dtype=torch.int64), self.value_row.float().contiguous(),
                                self.out_col.float().contiguous())))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TurnMean | None":
        """The turn mean stored in `tensors`, or None when they hold none."""
        if NAMES[0] not in tensors:
            return None
        layer, group = (int(v) for v in tensors[NAMES[0]].tolist())
        return cls(layer, group, tensors[NAMES[1]].float(), tensors[NAMES[2]].float())


@dataclass(frozen=True)
class Where:
    """The rewritten units: the group's heads (their query rows and output columns) and its value rows."""

    attn: torch.nn.Module
    heads: torch.Tensor
    values: torch.Tensor


def groups(model) -> tuple[int, int, int]:
    """(key-value groups, query heads per group, head dim) of the model's attention layers."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv, heads // kv, dim


def where(model, tm: TurnMean) -> Where:
    """The units `tm` rewrites, refusing a model or a turn mean that does not fit."""
    layers = decoder_layers(model)
    if not tm.layer < len(layers):
        raise ValueError(f"The turn mean's layer {tm.layer} is outside the model's layers 0..{len(layers) - 1}.")
    attn = getattr(layers[tm.layer], "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "v_proj", "o_proj")):
        raise ValueError(f"A turn mean rewrites separate query, value and output projections (the LLaMA family); "
                         f"'{model.config.model_type}' attention has none. Export without it (fold.switch_mean false).")
    kv, per, dim = groups(model)
    if not tm.group < kv:
        raise ValueError(f"The turn mean's key-value group {tm.group} is outside the model's groups 0..{kv - 1}.")
    if tm.value_row.shape[0] != attn.v_proj.in_features or tm.out_col.shape[0] != attn.o_proj.out_features:
        raise ValueError(f"The turn mean was made for hidden size {tm.value_row.shape[0]}, not {attn.v_proj.in_features}.")
    return Where(attn, torch.arange(tm.group * per * dim, (tm.group + 1) * per * dim), torch.arange(tm.group * dim, (tm.group + 1) * dim))


def new_rows(tm: TurnMean, w: Where) -> tuple[torch.Tensor, torch.Tensor]:
    """(the group's new value rows [dim, d_model], its heads' new output columns, neuron-major [per*dim, d_model])."""
    v = torch.zeros(len(w.values), tm.value_row.shape[0])
    v[0] = tm.value_row.float()
    o = torch.zeros(len(w.heads), tm.out_col.shape[0])
    o[0] = tm.out_col.float()
    return v, o


def hooks(model, tm: TurnMean, rows: torch.Tensor | None = None) -> list:
    """Forward hooks that make the model compute what the folded turn mean computes, on the batch rows where `rows`
    ([B] bool) is true if given (rows at strength 0 stay the base model exactly): the heads' queries set to 0, the
    group's values replaced, the output projection given what its new minus old columns add."""
    w = where(model, tm)
    v_new, o_new = new_rows(tm, w)
    o_delta = o_new - w.attn.o_proj.weight.detach().float().cpu()[:, w.heads].t()

    def replacing(idx: torch.Tensor, new):
        """Forward hook writing new(x) into units `idx` of the output (kept rows only)."""
        def hook(module, args, out):
            i = idx.to(out.device)
            changed = out.index_copy(-1, i, new(args[0], out.dtype).expand(*out.shape[:-1], len(i)))
            if rows is None:
                return changed
            return torch.where(rows.to(out.device).view(-1, *([1] * (out.dim() - 1))), changed, out)
        return hook
    zeros = lambda x, dtype: x.new_zeros((), dtype=dtype)  # noqa: E731
    values = lambda x, dtype: (x @ v_new.to(x.device, x.dtype).t()).to(dtype)  # noqa: E731
    return [(w.attn.q_proj, replacing(w.heads, zeros)), (w.attn.v_proj, replacing(w.values, values)),
            (w.attn.o_proj, delta_hook(w.heads, o_delta, rows, units_out=False))]


@torch.no_grad()
def folded(model, tm: TurnMean, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: new tensor} for what the turn mean changes (query, value, output weights; query and value biases
    where the model has them), starting from `state`'s tensors where it has them: copies, the model is not touched."""
    w = where(model, tm)
    names = {id(p): n for n, p in model.named_parameters()}
    v_new, o_new = new_rows(tm, w)
    out = {}

    def start(p):
        return (state or {}).get(names[id(p)], p).detach().clone()
    for module, idx, rows in ((w.attn.q_proj, w.heads, None), (w.attn.v_proj, w.values, v_new)):
        t = start(module.weight)
        t[idx.to(t.device)] = 0 if rows is None else rows.to(t.device, t.dtype)
        out[names[id(module.weight)]] = t
        if getattr(module, "bias", None) is not None:
            b = start(module.bias)
            b[idx.to(b.device)] = 0
            out[names[id(module.bias)]] = b
    t = start(w.attn.o_proj.weight)
    t[:, w.heads.to(t.device)] = o_new.to(t.device, t.dtype).t()
    out[names[id(w.attn.o_proj.weight)]] = t
    return out
