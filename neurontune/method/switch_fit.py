"""Fitting the folded switch (`interventions/switch.py`) of a run, from its training split, and the directions the
input-side terms of later layers read its flag with.

1. A bias-free logistic probe of layer L's MLP input tells the end of a harmful prompt from the end of a harmless one
   and from every earlier token of either (`Splits.harm_pools`: plain, inside the training attack families and the
   alarming-word pairs, so neither a template nor a word decides). A direction k that reads about 1 on every token
   stands in for the bias a gated MLP lacks.
2. The two neurons of layer L that matter least to harmless text (mean |activation| x output norm; never a selected
   neuron) become the switch: act(a w.x) - act(a w.x - T), about clamp(a w.x, 0, T), written along f, the direction the
   residual stream uses least (smallest variance of the normalised residual after L).
With `mean`, a key-value group of layer L's attention first becomes a turn mean (`interventions/turn_mean.py`): a
second probe, of the running mean of the attention input over every token so far (harmful prompt ends against harmless
ones and earlier tokens), written along the residual stream's second least-used direction by the group whose heads
matter least to the harmless prompts; step 1's probe is then fitted with it in place, so the switch reads the prompt's
end and the whole prompt. (The end alone fires on about a quarter of safe prompts with alarming words at the rate it
flags attacks; the whole prompt's mean far less: docs/results.md.)
3. With the switch in place, each later layer's reading direction is the linear read of the flag's actual imprint that
   the harmless tokens disturb least (Fisher: Σ⁻¹ δ), centred with that layer's k so that harmless tokens read about 0
   and scaled so that a harmful prompt's end reads 1. These are the `InputTerms` directions the training then uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.chat import chat_prompt
from ..data.splits import Splits
from ..infra.probes import fit_bias_free, roc_auc
from ..infra.progress import SILENT, Reporter
from ..interventions.capture import last_and_sampled
from ..interventions.generation import generate
from ..interventions.hooks import scoped_pre_hooks
from ..interventions.modulation import Modulation, modulate
from ..interventions.switch import Switch, require_gated
from ..interventions.switch import hooks as switch_hooks
from ..interventions.turn_mean import TurnMean, groups
from ..interventions.turn_mean import hooks as turn_mean_hooks
from ..model.neuron_map import decoder_layers

SHARPNESS = 2.0  # a: the probe's logit times a before the activation
CLAMP = 4.0  # T: the switch's output saturates at T times its column
AND_MARGIN = 8.0  # with an earlier switch: the logit the probe must read to fire while the earlier flag is down
FLAG = 0.3  # the flag's size against the residual stream's norm at the end of a prompt
RIDGE = 1e-2  # the reading directions' covariance ridge, relative to its mean variance
PROMPTS = 400  # harmful (and as many harmless) training prompts, plus PER_FAMILY per training attack family
PER_FAMILY = 40
READ_PROMPTS = 200  # of each pool, read again with the switch in place
MEAN_SIZE = 0.1  # the turn mean's write per probe standard deviation, against the residual stream's norm at a prompt's end
COST_PROMPTS = 48  # harmless training prompts the turn mean's group is chosen on, by their base answers' perplexity
COST_TOKENS = 24


@dataclass
class FittedSwitch:
    switch: Switch
    directions: dict[int, tuple[torch.Tensor, float]]  # layer -> (reading direction, offset 0): the input terms' directions
    info: dict = field(default_factory=dict)  # what the fit measured (firing rates, signal-to-noise per layer)
    and_step: torch.Tensor | None = None  # with an earlier switch: what one unit of margin adds to both gate rows, a (r - k)


def _constant(x: torch.Tensor) -> torch.Tensor:
    """k with x @ k about 1 on every row (ridge least squares)."""
    xd = x.double()
    lhs = xd.T @ xd + RIDGE * torch.eye(xd.shape[1], dtype=xd.dtype) * xd.pow(2).sum(1).mean()
    return torch.linalg.solve(lhs, xd.T @ torch.ones(len(xd), dtype=xd.dtype)).float()


@torch.no_grad()
def _least_used(lm, layer: int, x: torch.Tensor, exclude: torch.Tensor | None, k: int = 2) -> torch.Tensor:
    """The k neurons of a gated MLP with the smallest mean |act(gate x) * (up x)| x output-column norm on inputs x."""
    mlp = decoder_layers(lm.model)[layer].mlp
    gate = mlp.gate_proj.weight.detach().float().cpu()
    up = mlp.up_proj.weight.detach().float().cpu()
    act = F.silu(x @ gate.T) * (x @ up.T)
    use = act.abs().mean(0) * lm.nmap.weight_slice(layer).detach().float().cpu().norm(dim=1)
    if exclude is not None:
        use[exclude.cpu()] = float("inf")
    return use.argsort()[:k].sort().values


@torch.no_grad()
def group_costs(lm, layer: int, texts: list[str], tokens: int = COST_TOKENS) -> list[float]:
    """Perplexity ratio of the base model's own answers (`tokens` long) to `texts` (formatted harmless prompts) with
    each key-value group's heads of `layer` cut: what giving the group to a turn mean costs (the evaluation's measure)."""
    kv, per, dim = groups(lm.model)
    o_proj = decoder_layers(lm.model)[layer].self_attn.o_proj
    device = lm.model.get_input_embeddings().weight.device
    answers = generate(lm, texts, None, max_new_tokens=tokens, formatted=True)
    pairs = [(lm.tokenizer(t, add_special_tokens=False)["input_ids"], lm.tokenizer(a, add_special_tokens=False)["input_ids"])
             for t, a in zip(texts, answers)]
    pairs = [(p, a) for p, a in pairs if a]

    def nll(cut: int | None) -> float:
        hooks = [] if cut is None else [(o_proj, lambda m, a: (a[0].index_fill(-1, torch.arange(cut * per * dim, (cut + 1) * per * dim, device=a[0].device), 0.0),))]
        total, n = 0.0, 0
        with scoped_pre_hooks(hooks):
            for p, a in pairs:
                ids = torch.tensor([p + a], device=device)
                out = lm.model(input_ids=ids, use_cache=False).logits[0, len(p) - 1:-1].float()
                total += float(F.cross_entropy(out, ids[0, len(p):], reduction="sum"))
                n += len(a)
        return total / max(n, 1)
    base = nll(None)
    return [round(math.exp(nll(g) - base), 4) for g in range(kv)]


def fit_mean(lm, layer: int, texts: list[str], n_pos: int, direction: torch.Tensor, size: float) -> tuple[TurnMean, dict]:
    """The turn mean of layer `layer`: a bias-free probe (a constant folded in) of the running mean of the attention input
    telling harmful prompt ends (`texts[:n_pos]`) from harmless ones and from every earlier token, in the value row of
    the key-value group whose heads cost the harmless prompts least, written along `direction` at `size` per probe sd."""
    last, sampled = last_and_sampled(lm, texts, "attention_input", [layer], running_mean=True)
    x = torch.cat([last[layer], sampled[layer]])
    n_neg = len(last[layer]) - n_pos
    one = lambda t: torch.cat([t, torch.ones(len(t), 1)], 1)  # noqa: E731
    w = _probe(one(last[layer]), one(sampled[layer]), n_pos)
    row = w[:-1] + w[-1] * _constant(x)  # row . mean ~ w . [mean, 1]: the constant through a direction that reads ~1
    z = x @ row
    row = row / max(float(z.std()), 1e-6)
    costs = group_costs(lm, layer, texts[n_pos: n_pos + COST_PROMPTS])
    group = int(torch.tensor(costs).argmin())
    info = {"layer": layer, "group": group, "group_costs": costs, "train_auc": round(roc_auc(z[:n_pos], z[n_pos:n_pos + n_neg]), 3),
            "fires_harmful": round(float((z[:n_pos] > 0).float().mean()), 3),
            "fires_harmless": round(float((z[n_pos:n_pos + n_neg] > 0).float().mean()), 3),
            "fires_earlier_tokens": round(float((z[n_pos + n_neg:] > 0).float().mean()), 4)}
    return TurnMean(layer, group, row, size * direction), info


def fit_switch(lm, splits: Splits, layer: int | None = None, *, exclude: torch.Tensor | None = None, threshold: float = 0.0,
               mean: bool = False, earlier: int | None = None, margin: float | None = None,
               reporter: Reporter | None = None) -> FittedSwitch:
    """The switch of layer `layer` (default: the middle layer) and the reading directions of every later layer.
    `exclude`: bool, neurons the switches may not take (the run's selected neurons): [n_neurons] for that layer, or
    [n_layers, n_neurons]. `threshold`: the probe's logit the switch starts firing at (0: the probe's own boundary;
    higher fires on fewer prompts, harmless and harmful alike), written with k: a (w - t k) x is about a (w x - t).
    `earlier`: a layer before it whose own switch (its probe fitted the same way) the switch also reads: without that
    flag its probe must read above `margin` (default `AND_MARGIN`) to fire, so both layers' probes must read harmful (an
    AND); the switch at another margin is its gate rows plus (margin' - margin) x `and_step`."""
    margin = AND_MARGIN if margin is None else float(margin)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"The switch's threshold must be a logit of 0 or more, not {threshold}.")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"The AND's margin must be a logit of 0 or more, not {margin}.")
    reporter = reporter or SILENT
    n_layers = lm.nmap.n_layers
    layer = n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"The switch's layer must be in 0..{n_layers - 2} (a later layer must read its flag), not {layer}.")
    if earlier is not None and not 0 <= int(earlier) < layer:
        raise ValueError(f"The earlier switch's layer must be before the switch's ({layer}), not {earlier}.")
    if earlier is not None and mean:
        raise ValueError("A switch reads a turn mean or an earlier switch, not both.")
    require_gated(lm.nmap)
    excluded = lambda l: exclude if exclude is None or exclude.dim() == 1 else exclude[l]  # noqa: E731
    later = list(range(layer + 1, n_layers))
    harmful, harmless = splits.harm_pools("train", PROMPTS, PER_FAMILY)
    texts = [chat_prompt(lm.tokenizer, t) for t in harmful + harmless]
    n_pos = len(harmful)
    # the residual stream's least-used directions (after L, or after the earlier switch's layer): the flag's, and the
    # turn mean's or the earlier flag's
    some = texts[: READ_PROMPTS // 2] + texts[n_pos: n_pos + READ_PROMPTS // 2]
    after = later if earlier is None else list(range(int(earlier) + 1, n_layers))
    res_last, res_tok = last_and_sampled(lm, some, "residual", after)
    rows = torch.cat([torch.cat([res_last[l], res_tok[l]]) for l in after])
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-6)
    least = torch.linalg.eigh(torch.cov(rows.double().T)).eigenvectors[:, :2].float().T
    norm = float(res_last[later[0]].norm(dim=1).mean())
    f, size = least[0], FLAG * norm / CLAMP
    turn, mean_info, reads, first, first_info, r = None, None, [], None, None, None
    if mean:
        reporter.say("switch: fitting its turn mean")
        turn, mean_info = fit_mean(lm, layer, texts, n_pos, least[1], MEAN_SIZE * norm)
        reads = turn_mean_hooks(lm.model, turn)
    if earlier is not None:
        reporter.say(f"switch: fitting the earlier switch of layer {earlier}")
        first, first_info, before = _earlier(lm, texts, n_pos, int(earlier), layer, excluded(int(earlier)), least[1], size)
        reads = switch_hooks(lm.model, first, lm.nmap)
    reporter.say("switch: reading the training prompts")
    with scoped_pre_hooks([], post=reads):
        last, sampled = last_and_sampled(lm, texts, "mlp_input", [layer] + later)
    # 1. the probe: harmful prompt ends against harmless ones and against every earlier token
    constant = {l: _constant(torch.cat([last[l], sampled[l]])) for l in [layer] + later}
    k0 = constant[layer]
    if first is None:
        w = _probe(last[layer], sampled[layer], n_pos) - threshold * k0
    else:  # the AND. The probe is fitted on the prompts as they read without the earlier flag (so that the two layers'
        # errors stay apart), and keeps reading them so (its component along the flag's imprint taken out with r);
        # without the earlier flag (r x = 0) it must then read above the margin to fire.
        b_last, b_tok = before
        r = _flag_read(b_last[:n_pos], last[layer], sampled[layer], n_pos, k0)
        w = _probe(b_last, b_tok, n_pos)
        w = w - float(w @ (last[layer][:n_pos] - b_last[:n_pos]).mean(0)) * r
        w = w - threshold * k0 + margin * (r - k0)
        first_info["flag_read"] = {"harmful": round(float((last[layer][:n_pos] @ r).mean()), 3),
                                   "harmless": round(float((last[layer][n_pos:] @ r).mean()), 3)}
    # 2. the switch's neurons, the flag's direction and size
    neurons = _least_used(lm, layer, torch.cat([last[layer][n_pos:], sampled[layer]]), excluded(layer))
    switch = Switch(layer, neurons, torch.stack([SHARPNESS * w, SHARPNESS * w - CLAMP * k0]), torch.stack([k0, k0]),
                    torch.stack([size * f, -size * f]), turn, first)
    # 3. each later layer's reading direction, from the switch's imprint against the harmless tokens' spread
    reporter.say("switch: reading its flag in later layers")
    pos_idx = list(range(min(READ_PROMPTS, n_pos)))
    again = [texts[i] for i in pos_idx] + texts[n_pos: n_pos + READ_PROMPTS]
    with modulate(lm.model, Modulation(lm.nmap.shape, switch=switch), lm.nmap):
        on_last, on_tok = last_and_sampled(lm, again, "mlp_input", later, seed=1)
    directions, snr = {}, {}
    n_again = len(pos_idx)
    for l in later:
        delta = (on_last[l][:n_again] - last[l][pos_idx]).mean(0).double()
        noise = torch.cat([on_last[l][n_again:], on_tok[l]]).double()
        cov = torch.cov(noise.T)
        cov += RIDGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        e = torch.linalg.solve(cov, delta)
        e = (e / (e @ delta)).float()
        e = e - float((noise.float() @ e).mean()) * constant[l]
        span = float((on_last[l][:n_again] @ e).mean())
        e = e / span
        directions[l] = (e, 0.0)
        snr[l] = round(1.0 / float((noise.float() @ e).std()), 1)
    z_pos, z_neg = last[layer][:n_pos] @ w, last[layer][n_pos:] @ w
    info = {"layer": layer, "neurons": neurons.tolist(), "threshold": threshold, "train_auc": round(roc_auc(z_pos, z_neg), 3),
            "fires_harmful": round(float((z_pos > 0).float().mean()), 3), "fires_harmless": round(float((z_neg > 0).float().mean()), 3),
            "fires_earlier_tokens": round(float((sampled[layer] @ w > 0).float().mean()), 4), "flag_snr": snr}
    if mean_info is not None:
        info["mean"] = mean_info
    if first_info is not None:
        info["earlier"] = first_info
    return FittedSwitch(switch, directions, info, None if r is None else SHARPNESS * (r - k0))


def _probe(last: torch.Tensor, sampled: torch.Tensor, n_pos: int) -> torch.Tensor:
    """The switch's probe: a bias-free logistic fit of the harmful prompt ends (`last[:n_pos]`) against the harmless
    ones and every sampled earlier token, weighted 1 : 1/2 : 1/2."""
    n_neg, n_tok = len(last) - n_pos, len(sampled)
    y = torch.cat([torch.ones(n_pos), torch.zeros(n_neg + n_tok)])
    weight = torch.cat([torch.full((n_pos,), 1.0 / n_pos), torch.full((n_neg,), 0.5 / n_neg), torch.full((n_tok,), 0.5 / n_tok)])
    return fit_bias_free(torch.cat([last, sampled]), y, weight)


def _earlier(lm, texts: list[str], n_pos: int, layer: int, main: int, exclude: torch.Tensor | None, f: torch.Tensor,
             size: float) -> tuple[Switch, dict, tuple[torch.Tensor, torch.Tensor]]:
    """The earlier switch of an AND (`fit_switch(earlier=...)`): the probe of layer `layer` fitted like the switch's,
    its ramp moved so that the flag is full where the probe reads 0 (partial from -T/a), written along `f`; and the MLP
    input of layer `main` without it (prompt ends, sampled earlier tokens)."""
    last, sampled = last_and_sampled(lm, texts, "mlp_input", [layer, main])
    w, k = _probe(last[layer], sampled[layer], n_pos), _constant(torch.cat([last[layer], sampled[layer]]))
    neurons = _least_used(lm, layer, torch.cat([last[layer][n_pos:], sampled[layer]]), exclude)
    w_full = w + (CLAMP / SHARPNESS) * k  # its ramp ends where its probe reads 0: full wherever it reads harmful
    switch = Switch(layer, neurons, torch.stack([SHARPNESS * w_full, SHARPNESS * w_full - CLAMP * k]), torch.stack([k, k]),
                    torch.stack([size * f, -size * f]))
    z_pos, z_neg = last[layer][:n_pos] @ w, last[layer][n_pos:] @ w
    info = {"layer": layer, "neurons": neurons.tolist(), "train_auc": round(roc_auc(z_pos, z_neg), 3),
            "fires_harmful": round(float((z_pos > 0).float().mean()), 3), "fires_harmless": round(float((z_neg > 0).float().mean()), 3)}
    return switch, info, (last[main], sampled[main])


def _flag_read(before: torch.Tensor, on_last: torch.Tensor, on_tok: torch.Tensor, n_pos: int, k: torch.Tensor) -> torch.Tensor:
    """The read of an earlier switch's flag in a later MLP input: its imprint on the harmful prompts' ends (`on_last`
    with it against `before` without it) that harmless ends and earlier tokens (with it) disturb least (Fisher),
    centred with k so that they read about 0, scaled so that the harmful ends read 1 on average."""
    delta = (on_last[:n_pos] - before).mean(0).double()
    noise = torch.cat([on_last[n_pos:], on_tok]).double()
    cov = torch.cov(noise.T)
    cov += RIDGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    r = torch.linalg.solve(cov, delta).float()
    r = r - float((noise.float() @ r).mean()) * k
    return r / float((on_last[:n_pos] @ r).mean())
