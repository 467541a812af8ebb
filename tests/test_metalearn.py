"""Meta-learned gains on a tiny model: bounds, loss goes down, reproducible, cancel and NaN handling."""
import threading

import pytest
import torch

from conftest import Recorder
from neurontune.config import RunConfig
from neurontune.data.chat import chat_prompt
from neurontune.method.metalearn import train_gains
from neurontune.method.neuron_scores import run_attribution
from neurontune.method.selection import select

SMALL = dict(data={"n_harmful": 6, "n_attack_per_family": 2, "n_benign": 6, "n_borderline": 4, "n_answer": 4, "answer_tokens": 6},
             selection={"k_safety": 40, "k_utility": 30, "protect_top": 5},
             meta={"steps": 12, "eval_every": 4, "patience": 10, "batch_harmful": 4, "batch_benign": 4, "outer_lr": 0.1})


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = RunConfig(model="tiny-llama").replace(**SMALL)
    scores = run_attribution(tiny_llama, cfg, cache_dir=cache)
    return tiny_llama, cfg, select(scores, cfg.selection), cache


@pytest.mark.parametrize("mode", ["fomaml", "reptile", "joint"])
def test_gains_stay_in_bounds_and_only_selected_change(setup, mode):
    lm, cfg, sel, cache = setup
    result = train_gains(lm, sel, cfg.replace(meta={"mode": mode}), cache_dir=cache)
    dense = result.modulation.dense()
    assert (dense[sel.safety] >= 1).all() and (dense[sel.safety] <= cfg.meta.max_gain).all()
    assert (dense[sel.utility] >= 0).all() and (dense[sel.utility] <= 1).all()
    untouched = ~(sel.safety | sel.utility)
    assert (dense[untouched] == 1).all()
    assert (dense != 1).any(), "training moved no gain"
    assert result.modulation.fingerprint == lm.fingerprint


def test_unconstrained_option_lifts_bounds(setup):
    lm, cfg, sel, cache = setup
    result = train_gains(lm, sel, cfg.replace(meta={"constrained": False, "mode": "joint", "outer_lr": 0.5}), cache_dir=cache)
    dense = result.modulation.dense()
    assert (dense[sel.utility] > 1).any() or (dense[sel.safety] < 1).any()


def test_training_lowers_the_loss(setup):
    lm, cfg, sel, cache = setup
    result = train_gains(lm, sel, cfg.replace(meta={"mode": "joint", "steps": 25, "eval_every": 5, "patience": 99, "outer_lr": 0.1}), cache_dir=cache)
    vals = [e["val"] for e in result.log if "val" in e]
    assert min(vals[1:]) < vals[0]
    first = sum(e["refusal_nll"] for e in result.log[:5]) / 5
    last = sum(e["refusal_nll"] for e in result.log[-5:]) / 5
    assert last < first


def test_reproducible_under_a_seed(setup):
    lm, cfg, sel, cache = setup
    a = train_gains(lm, sel, cfg, cache_dir=cache).modulation.dense()
    b = train_gains(lm, sel, cfg, cache_dir=cache).modulation.dense()
    c = train_gains(lm, sel, cfg.replace(meta={"seed": 1}), cache_dir=cache).modulation.dense()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cancel_stops_and_keeps_gains(setup):
    lm, cfg, sel, cache = setup
    class StopAfterThree(Recorder):
        def step(self, entry):
            super().step(entry)
            if len(self.steps) == 3:
                self.cancel.set()
    result = train_gains(lm, sel, cfg, cache_dir=cache, reporter=StopAfterThree(threading.Event()))
    assert result.stopped == "cancelled" and len(result.log) == 3


def test_non_finite_loss_stops_and_keeps_last_good_gains(setup, monkeypatch):
    lm, cfg, sel, cache = setup
    from neurontune.method import metalearn
    calls = {"n": 0}
    original = metalearn.Objective.__call__

    def poisoned(self, gains, batch):
        calls["n"] += 1
        loss, terms = original(self, gains, batch)
        return (loss * float("nan") if calls["n"] > 6 else loss), terms
    monkeypatch.setattr(metalearn.Objective, "__call__", poisoned)
    result = train_gains(lm, sel, cfg.replace(meta={"mode": "joint", "eval_every": 100}), cache_dir=cache)
    assert result.stopped == "non_finite"
    assert torch.isfinite(result.modulation.dense()).all()
    assert "error" in result.log[-1]


def test_refusal_targets_end_with_end_of_turn(tiny_llama):
    """With refusal_eos the harmful/benign refusal targets end with the eos id (scored), answers do not (benign
    refusal targets are those of the whole-sentence over-refusal penalty)."""
    from neurontune.method.metalearn import Objective
    tok = tiny_llama.tokenizer
    cfg = RunConfig(model="tiny-llama").replace(meta={"over_refusal_span": "target"})
    on = Objective(tiny_llama, cfg).batch(["how to x"], ["bake bread"], [("hi", "hello there")]).pairs
    off = Objective(tiny_llama, cfg.replace(meta={"refusal_eos": False})).batch(["how to x"], ["bake bread"], [("hi", "hello there")]).pairs
    for role in ("harmful", "benign"):
        assert on[role].input_ids[0, -1] == tok.eos_token_id and bool(on[role].target_mask[0, -1])
        assert off[role].input_ids[0, -1] != tok.eos_token_id
        assert int(on[role].target_mask.sum()) == int(off[role].target_mask.sum()) + 1
    assert torch.equal(on["answers"].input_ids, off["answers"].input_ids)


def test_refusal_targets_keep_the_first_n_targets(setup):
    """meta.refusal_targets n: every harmful and benign row is taught the first n refusal targets (row i gets target
    i mod n), token for token what encode_pairs gives for those sentences; null is every target, the same batches bit
    for bit as naming all of them; the training then differs from the default; the fold keeps its own setting
    (null: all); a count beyond the file is refused with what to set."""
    from neurontune.data import prompts
    from neurontune.method.metalearn import Objective
    from neurontune.model.logprobs import encode_pairs
    lm, cfg, sel, cache = setup
    tok, every = lm.tokenizer, prompts.targets()["refusal"]
    harmful = [chat_prompt(tok, f"How do I do harmful thing {i}?") for i in range(5)]
    benign = [chat_prompt(tok, f"How do I bake loaf {i}?") for i in range(4)]
    cut = cfg.replace(meta={"refusal_targets": 2})
    pairs = Objective(lm, cut).batch(harmful, benign, []).pairs
    want = encode_pairs(tok, harmful, [every[i % 2] for i in range(5)], cfg.attribution.max_length, end_with_eos=True)
    assert torch.equal(pairs["harmful"].input_ids, want.input_ids) and torch.equal(pairs["harmful"].target_mask, want.target_mask)
    want = encode_pairs(tok, benign, [every[(i + 3) % 2] for i in range(4)], cfg.attribution.max_length, end_with_eos=True)
    assert torch.equal(pairs["benign"].input_ids, want.input_ids)
    default = Objective(lm, cfg).batch(harmful, benign, []).pairs
    named = Objective(lm, cfg.replace(meta={"refusal_targets": len(every)})).batch(harmful, benign, []).pairs
    assert all(torch.equal(default[r].input_ids, named[r].input_ids) for r in ("harmful", "benign"))
    assert not torch.equal(default["harmful"].input_ids, pairs["harmful"].input_ids)
    one = train_gains(lm, sel, cfg.replace(meta={"refusal_targets": 1, "steps": 4}), cache_dir=cache).modulation.dense()
    all_ = train_gains(lm, sel, cfg.replace(meta={"steps": 4}), cache_dir=cache).modulation.dense()
    assert not torch.equal(one, all_)
    assert cut.fold.meta(cut.meta).refusal_targets is None
    assert cut.replace(fold={"refusal_targets": 1}).fold.meta(cut.meta).refusal_targets == 1
    with pytest.raises(ValueError, match=f"set it to at most {len(every)}"):
        Objective(lm, cfg.replace(meta={"refusal_targets": len(every) + 1}))
    with pytest.raises(ValueError, match="meta.refusal_targets must be a count"):
        cfg.replace(meta={"refusal_targets": 0})


def test_refusal_probability_is_the_sum_over_openings(tiny_llama):
    """p(refuse) of a prompt = the sum over the refusal openings of p(opening | prompt), each by brute force."""
    from neurontune.method.metalearn import Objective
    from neurontune.model.logprobs import encode_pairs, forward, target_logprob
    obj = Objective(tiny_llama, RunConfig().replace(meta={"over_refusal_span": "opening", "opening_weight": 1.0}))
    tok = tiny_llama.tokenizer
    prompts = [chat_prompt(tok, "How do I bake bread?"), chat_prompt(tok, "Write a story about a cat")]
    batch = obj.batch(prompts, prompts, []).pairs
    with torch.no_grad():
        got = obj._p_refuse(batch["benign_open"])
        for b, p in enumerate(prompts):
            want = sum(float(target_logprob(forward(tiny_llama.model, one), one).exp())
                       for one in (encode_pairs(tok, [p], [o]) for o in obj.openings))
            assert float(got[b]) == pytest.approx(min(want, 1.0), rel=1e-4)
    assert "benign" not in batch and batch["harmful_open"].input_ids.shape[0] == 2 * len(obj.openings)


def _probe(bias: float):
    """A gate that reads one neuron and is shut (bias -60) or open (bias +60) for every prompt."""
    from neurontune.interventions.gating import GateProbe
    return GateProbe(torch.tensor([0]), torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.zeros(1), bias)


def test_behind_a_shut_gate_nothing_is_learned_and_behind_an_open_one_everything_is(setup):
    """Gate-aware training applies each prompt's reading: a gate shut on every prompt gives every loss term a zero
    gradient (the gains stay exactly 1); one open on every prompt trains as if there were no gate."""
    lm, cfg, sel, cache = setup
    joint = cfg.replace(meta={"mode": "joint", "steps": 4, "eval_every": 100})
    shut = train_gains(lm, sel, joint, cache_dir=cache, gate=_probe(-60.0))
    assert torch.equal(shut.modulation.dense(), torch.ones(lm.shape))
    assert shut.modulation.meta["trained_behind_gate"] is True
    opened = train_gains(lm, sel, joint, cache_dir=cache, gate=_probe(60.0)).modulation.dense()
    free = train_gains(lm, sel, joint, cache_dir=cache).modulation.dense()
    assert (free != 1).any() and torch.allclose(opened, free, atol=1e-5)


def test_a_gate_reads_each_training_prompt_once(setup, monkeypatch):
    from neurontune.interventions.gating import GateProbe
    lm, cfg, sel, cache = setup
    read: list[str] = []
    real = GateProbe.read
    monkeypatch.setattr(GateProbe, "read", lambda self, lm_, texts, *a: read.extend(texts) or real(self, lm_, texts, *a))
    train_gains(lm, sel, cfg.replace(meta={"mode": "joint", "steps": 6, "eval_every": 3}), cache_dir=cache, gate=_probe(0.0))
    assert read and len(read) == len(set(read))  # cached: the unmodulated reading of a prompt never changes


def test_conditional_training_learns_input_terms_on_centred_directions(setup):
    """meta.conditional trains one input coefficient per selected neuron along its layer's harm direction: the terms
    come out non-zero, on selected neurons only, and the direction of a bias-free up projection is centred (the mean
    training input projects to 0); with a zero learning rate the terms stay 0 and the gains equal static training."""
    from neurontune.method.conditional import harm_directions
    lm, cfg, sel, cache = setup
    ccfg = cfg.replace(meta={"mode": "joint", "steps": 6, "eval_every": 100, "conditional": True, "input_lr": 0.1,
                             "direction_prompts": 12})
    mod = train_gains(lm, sel, ccfg, cache_dir=cache).modulation
    assert mod.conditional and mod.meta["conditional"] is True
    chosen = sel.safety | sel.utility
    for layer, terms in mod.inputs.items():
        assert chosen[layer, terms.indices].all() and terms.offset == 0.0
    assert max(float(t.coef.abs().max()) for t in mod.inputs.values()) > 0
    frozen = train_gains(lm, sel, ccfg.replace(meta={"input_lr": 0.0}), cache_dir=cache).modulation
    static = train_gains(lm, sel, ccfg.replace(meta={"conditional": False}), cache_dir=cache).modulation
    assert not frozen.conditional and torch.allclose(frozen.dense(), static.dense(), atol=1e-6)
    from neurontune.data.splits import build_splits
    from neurontune.interventions.capture import last_token
    pos, neg = build_splits(cfg.data).harm_pools("train", 12, 1)
    directions = harm_directions(lm, pos, neg, [0, 2])
    x = last_token(lm, [chat_prompt(lm.tokenizer, t) for t in pos + neg], "mlp_input", layers=[0, 2])
    for i, layer in enumerate((0, 2)):
        d, offset = directions[layer]
        assert offset == 0.0 and float(x[:, i].mean(0) @ d) == pytest.approx(0.0, abs=1e-4)
        assert float((x[:, i] @ d).std()) == pytest.approx(1.0, rel=1e-3)  # unit spread over the prompts
        assert float(x[: len(pos), i].mean(0) @ d) > float(x[len(pos):, i].mean(0) @ d)  # harmful reads higher


def test_kl_answers_harmless_keeps_the_benign_answers_and_adds_every_harmless_kind(setup):
    """meta.kl_answers "harmless": the KL pool is the default pool (same prompts, same answers, same order) followed by
    borderline-safe, alarming-word and template-wrapped benign requests of the same split; the fold passes it through;
    a bad value is refused with what to write."""
    from neurontune.data.splits import build_splits
    from neurontune.method.metalearn import build_tasks
    lm, cfg, sel, cache = setup
    splits = build_splits(cfg.data)
    plain = build_tasks(lm, cfg, splits, cache)
    wide = build_tasks(lm, cfg.replace(meta={"kl_answers": "harmless"}), splits, cache)
    n = len(plain.answers)
    assert wide.answers[:n] == plain.answers and wide.val_answers[:len(plain.val_answers)] == plain.val_answers
    extra = [p for p, _ in wide.answers[n:]]
    k = max(cfg.data.n_answer, 8) // 2
    assert len(extra) == 3 * k
    assert extra[:k] == [chat_prompt(lm.tokenizer, p.text) for p in splits.borderline["train"][:k]]
    assert extra[k:2 * k] == [chat_prompt(lm.tokenizer, p.text) for p in splits.alarming["train"][:k]]
    bare = {chat_prompt(lm.tokenizer, p.text) for p in splits.benign["train"]}
    assert all(p not in bare and any(b.text in p for b in splits.benign["train"]) for p in extra[2 * k:])  # wrapped
    assert plain.harmful == wide.harmful and plain.benign == wide.benign  # nothing else moves
    assert cfg.replace(fold={"form": "switch", "kl_answers": "harmless"}).fold.meta(cfg.meta).kl_answers == "harmless"
    assert cfg.replace(meta={"kl_answers": "harmless"}).fold.meta(cfg.replace(meta={"kl_answers": "harmless"}).meta).kl_answers == "harmless"
    with pytest.raises(ValueError, match="meta.kl_answers must be 'benign' or 'harmless'"):
        cfg.replace(meta={"kl_answers": "all"})
    with pytest.raises(ValueError, match="fold.kl_answers must be"):
        cfg.replace(fold={"kl_answers": "everything"})


def test_kl_skip_leaves_each_answers_opening_out_of_the_kl_term(tiny_llama):
    """meta.kl_skip k: the KL term is the mean, over every answer token after each answer's first k, of
    KL(base || modulated), each computed by brute force on one unpadded row; k = 0 reads every token; a k that
    leaves no answer token is refused with what to set."""
    import torch.nn.functional as F
    from neurontune.method.metalearn import Objective
    from neurontune.model.logprobs import encode_pairs
    lm, tok = tiny_llama, tiny_llama.tokenizer
    answers = [(chat_prompt(tok, "How do I bake bread?"), "Mix flour, water and yeast, then knead it well"),
               (chat_prompt(tok, "Name a colour"), "Blue, like the sky")]
    gen = torch.Generator().manual_seed(0)
    view = (1 + 0.5 * torch.rand(lm.shape, generator=gen), {})
    for k in (0, 3):
        cfg = RunConfig(model="tiny-llama").replace(meta={"kl_skip": k, "lam_kl": 1.0, "mu_over_refusal": 0.0})
        obj = Objective(lm, cfg)
        with torch.no_grad():
            _, terms = obj(view, obj.batch([], [], answers))
            per_token = []
            for p, a in answers:
                one = encode_pairs(tok, [p], [a])
                n_p = int((~one.target_mask[0]).sum())
                with obj._applied(view, None):
                    mod = F.log_softmax(lm.model(input_ids=one.input_ids).logits[0].float(), -1)
                base = F.log_softmax(lm.model(input_ids=one.input_ids).logits[0].float(), -1)
                for t in range(n_p - 1 + k, one.input_ids.shape[1] - 1):  # logits at t predict token t + 1
                    per_token.append(float((base[t].exp() * (base[t] - mod[t])).sum()))
        assert len(per_token) > 0
        assert terms["kl"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-4, abs=1e-7)
    assert RunConfig().replace(fold={"kl_skip": 2}).fold.meta(RunConfig().meta).kl_skip == 2
    assert RunConfig().replace(meta={"kl_skip": 5}).fold.meta(RunConfig().replace(meta={"kl_skip": 5}).meta).kl_skip == 5
    with pytest.raises(ValueError, match="meta.kl_skip must be a count"):
        RunConfig().replace(meta={"kl_skip": -1})
    with pytest.raises(ValueError, match="set it below data.answer_tokens"):
        Objective(lm, RunConfig(model="tiny-llama").replace(meta={"kl_skip": 24}, data={"answer_tokens": 24}))
