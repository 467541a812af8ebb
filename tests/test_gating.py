"""Input-conditional gating: strength 1 equals the full modulation, 0 equals the base, per row, isolated."""
import pytest
import torch
from conftest import random_modulation

from neurontune.data import prompts as sets
from neurontune.data.chat import chat_prompt
from neurontune.interventions.gating import Gated
from neurontune.method.gate_fit import fit_gate
from neurontune.interventions.modulation import modulate
from neurontune.model.logprobs import encode_pairs, forward


def test_gate_strength_extremes_and_rows(tiny_llama):
    lm = tiny_llama
    mod = random_modulation(lm.shape, 80, seed=1, low=1.5, high=3.0, fingerprint=lm.fingerprint)
    pos = [p.text for p in sets.harmful()[:16]]
    neg = [p.text for p in sets.benign()[:16]]
    probe = fit_gate(lm, mod, pos, neg)
    assert probe.train_accuracy >= 0.75
    gated = Gated(mod, probe)
    batch = encode_pairs(lm.tokenizer, [chat_prompt(lm.tokenizer, x) for x in pos[:2] + neg[:2]], ["Sure"] * 4)
    with torch.no_grad():
        base = forward(lm.model, batch)
        with modulate(lm.model, mod):
            full = forward(lm.model, batch)
        with gated.apply(lm) as state:
            mixed = forward(lm.model, batch)
        s = state["s"]
        assert s.shape == (4,) and ((s >= 0) & (s <= 1)).all() and s[:2].mean() > s[2:].mean()
        probe.weight.zero_()
        probe.bias = 60.0
        with gated.apply(lm):
            assert torch.equal(forward(lm.model, batch), full)
        probe.bias = -60.0
        with gated.apply(lm):
            assert torch.equal(forward(lm.model, batch), base)
    # the mixed run sits between base and full for each row
    assert not torch.equal(mixed, base) and not torch.equal(mixed, full)
    # hooks are gone after the block
    assert all(not p._forward_pre_hooks for p in lm.nmap.projections) and not lm.model._forward_pre_hooks


def test_truncated_or_corrupted_gate_file_is_refused(tiny_llama, tmp_path):
    from neurontune.interventions.gating import GateProbe
    probe = GateProbe(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.zeros(2), torch.ones(2), torch.ones(2), 0.5)
    path = probe.save(tmp_path / "gate.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable gate file"):
        GateProbe.load(tmp_path / "cut.safetensors")
    bad = GateProbe(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.zeros(2), torch.ones(2), torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="corrupted gate file"):
        GateProbe.load(bad.save(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="outside this model"):
        GateProbe.load(path, shape=(1, 2))


def test_teacher_forced_metrics_read_the_gate_at_the_prompt_end(tiny_llama, monkeypatch):
    """Perplexity and multiple choice apply the gate read from the prompt alone: answers of another text leave
    every strength unchanged, and the strengths equal the gate's reading of the formatted prompts."""
    from neurontune.config import DataConfig, EvalConfig
    from neurontune.data.splits import build_splits
    from neurontune.eval import harness
    from neurontune.eval import teacher_forced as tf
    lm, splits = tiny_llama, build_splits(DataConfig())
    mod = random_modulation(lm.shape, 60, seed=2, fingerprint=lm.fingerprint)
    probe = fit_gate(lm, mod, [p.text for p in splits.harmful_train[:6]], [p.text for p in splits.benign_train[:6]], steps=20)
    gated = Gated(mod, probe)
    cfg = EvalConfig(n_harmful=1, n_per_family=1, families=("roleplay",), n_benign=1, n_borderline=1, n_benign_per_family=2,
                     n_ppl=4, n_mc=3, max_new_tokens=4, batch_size=4)
    seen = {"nll": [], "mc": []}
    real_nll, real_mc = tf.answer_nll, tf.mc_predictions

    def nll(lm_, iv, prompts, answers, *a, strengths=None, **k):
        if iv is not None:
            seen["nll"].append((list(answers), strengths))
        return real_nll(lm_, iv, prompts, answers, *a, strengths=strengths, **k)

    def mc(lm_, iv, cfg_, *a, strengths=None, **k):
        if iv is not None:
            seen["mc"].append(strengths)
        return real_mc(lm_, iv, cfg_, *a, strengths=strengths, **k)
    monkeypatch.setattr(tf, "answer_nll", nll)
    monkeypatch.setattr(tf, "mc_predictions", mc)
    first = harness.evaluate(lm, gated, splits, cfg)
    cache = first.base_cache
    for key in list(cache["answers"]):  # other answer texts for the same prompts
        cache["answers"][key] = "A completely different answer about gardening and the weather in spring."
    cache["nll"] = {}
    harness.evaluate(lm, gated, splits, cfg, base=cache)
    (answers_a, s_a), (answers_b, s_b) = seen["nll"]
    assert answers_a != answers_b and s_a == s_b
    ppl = [p.text for p in splits.benign["test"][: cfg.n_ppl]]
    expected = probe.read(lm, [chat_prompt(lm.tokenizer, p) for p in ppl]).tolist()
    assert s_a == pytest.approx(expected)
    questions = [q["question"] for q in sets.multiple_choice()[: cfg.n_mc]]
    assert seen["mc"][0] == seen["mc"][1] == pytest.approx(probe.read(lm, [chat_prompt(lm.tokenizer, q) for q in questions]).tolist())
    assert {r["strength"] for r in first.rows} != {1.0}  # generation rows carry their own readings


def test_gate_features_equal_the_full_activations_at_the_last_token(lm):
    """The hooks keep only the feature neurons at the last position (on the layer's device); the values equal
    picking them out of every layer's full activations afterwards, exactly, in the probe's feature order."""
    from neurontune.interventions.capture import unit_features
    gen = torch.Generator().manual_seed(0)
    layers = torch.tensor([2, 0, 2, 1, 0, 2])
    neurons = torch.randint(0, lm.shape[1], (len(layers),), generator=gen)
    texts = [chat_prompt(lm.tokenizer, p) for p in ("Hi", "How do I pick a lock?", "A longer request about bread")]
    got = unit_features(lm, texts, layers, neurons, batch_size=2)
    full: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_pre_hook(lambda m, a, l=l: full.__setitem__(l, a[0].reshape(1, -1, a[0].shape[-1])))
               for l, p in enumerate(lm.nmap.projections)]
    try:
        want = []
        for text in texts:  # one prompt at a time: no padding at all
            ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=False)
            want.append(torch.stack([full[int(l)][0, -1, int(n)] for l, n in zip(layers, neurons)]))
    finally:
        for h in handles:
            h.remove()
    assert got.shape == (3, len(layers)) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_gated_generation_applies_the_gains_at_each_prompts_reading(tiny_llama):
    """A gate forced open generates exactly what the static gains generate, one forced shut what the base model
    generates; free-form generation reads each new prompt once and leaves no hook behind."""
    from neurontune.interventions.gating import GateProbe
    from neurontune.interventions.generation import generate
    lm = tiny_llama
    mod = random_modulation(lm.shape, 60, seed=2, low=0.2, high=3.0, fingerprint=lm.fingerprint)
    probe = GateProbe(torch.tensor([0]), torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.zeros(1), 60.0)
    prompts = ["Tell me about bread", "Hi"]
    with Gated(mod, probe).apply(lm) as state:
        gated = generate(lm, prompts, max_new_tokens=8)
    assert state["s"].tolist() == [1.0, 1.0]
    assert gated == generate(lm, prompts, mod, max_new_tokens=8)
    assert gated != generate(lm, prompts, max_new_tokens=8)
    probe.bias = -60.0
    with Gated(mod, probe).apply(lm):
        assert generate(lm, prompts, max_new_tokens=8) == generate(lm, prompts, max_new_tokens=8)
    assert all(not p._forward_pre_hooks for p in lm.nmap.projections) and not lm.model._forward_pre_hooks


def test_bias_shift_is_chosen_on_validation(tiny_llama):
    """With bias_shift=None the shift maximises TPR - FPR on validation prompts; a given shift is used as is."""
    from neurontune.config import DataConfig
    from neurontune.data.splits import build_splits
    from neurontune.method import gate_fit as gating
    splits = build_splits(DataConfig())
    mod = random_modulation(tiny_llama.shape, 60, seed=2, fingerprint=tiny_llama.fingerprint)
    fixed = gating.fit_gate_for_run(tiny_llama, mod, splits, bias_shift=1.5)
    chosen = gating.fit_gate_for_run(tiny_llama, mod, splits, bias_shift=None)
    assert fixed.bias_shift == 1.5 and chosen.bias_shift in gating.SHIFTS
    assert chosen.bias - chosen.bias_shift == pytest.approx(fixed.bias - 1.5)  # the same fitted probe underneath
    unshifted = Gated(mod, fixed).probe
    unshifted.bias -= 1.5
    unshifted.bias_shift = 0.0
    pos, neg = splits.harm_pools("validation", 48, 6)
    def youden(shift):
        s_pos = unshifted.read(tiny_llama, [chat_prompt(tiny_llama.tokenizer, t) for t in pos])
        s_neg = unshifted.read(tiny_llama, [chat_prompt(tiny_llama.tokenizer, t) for t in neg])
        logit = lambda s: torch.log(s) - torch.log1p(-s)  # noqa: E731
        return float((logit(s_pos) + shift > 0).float().mean() - (logit(s_neg) + shift > 0).float().mean())
    assert youden(chosen.bias_shift) >= max(youden(s) for s in (-2.0, 0.0, 2.0)) - 1e-9


def test_layer_gate_reads_the_layer_that_separates_validation_best(tiny_llama, tmp_path):
    """features="layer": every neuron of one layer, the layer whose probe (fitted on train) ranks the validation
    prompts best, checked against fitting every layer by hand; it saves, loads and gates like any probe."""
    from neurontune.config import DataConfig
    from neurontune.data.splits import build_splits
    from neurontune.infra.probes import fit_probe, roc_auc
    from neurontune.interventions.capture import unit_features
    from neurontune.interventions.gating import GateProbe
    from neurontune.method import gate_fit as gating
    lm, splits = tiny_llama, build_splits(DataConfig())
    n_layers, n_neurons = lm.shape
    pos, neg = [p.text for p in splits.harmful_train[:12]], [p.text for p in splits.benign_train[:12]]
    vpos, vneg = splits.harm_pools("validation", 8, 2)
    probe = gating.fit_layer_gate(lm, pos, neg, vpos, vneg)
    assert len(set(probe.layers.tolist())) == 1 and probe.neurons.tolist() == list(range(n_neurons))

    def acts(texts, layer):
        return unit_features(lm, [chat_prompt(lm.tokenizer, t) for t in texts], torch.full((n_neurons,), layer),
                             torch.arange(n_neurons))
    aucs = {}
    for layer in range(n_layers):
        mean, std, w, b = fit_probe(acts(pos + neg, layer), torch.tensor([1.0] * 12 + [0.0] * 12))
        z = ((acts(vpos + vneg, layer) - mean) / std) @ w + b
        aucs[layer] = roc_auc(z[: len(vpos)], z[len(vpos):])
    assert int(probe.layers[0]) == max(aucs, key=lambda l: (aucs[l], -l))
    probe.save(tmp_path / "gate.safetensors")
    back = GateProbe.load(tmp_path / "gate.safetensors", shape=lm.shape)
    texts = [chat_prompt(lm.tokenizer, t) for t in vpos[:2] + vneg[:2]]
    assert torch.allclose(back.read(lm, texts), probe.read(lm, texts))
    with pytest.raises(ValueError, match="amplified"):
        gating.fit_gate_for_run(lm, random_modulation(lm.shape, 10, fingerprint=lm.fingerprint), splits, features="neurons")


def neurons_run_alone(lm, rows, layers, neurons) -> list[torch.Tensor]:
    """Brute-force reference: for each token-id row run alone (no padding), [k, T] the units (layers[i], neurons[i])
    at every position."""
    full: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_pre_hook(lambda m, a, l=l: full.__setitem__(l, a[0].reshape(1, -1, a[0].shape[-1])))
               for l, p in enumerate(lm.nmap.projections)]
    try:
        out = []
        for row in rows:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([row]), use_cache=False)
            out.append(torch.stack([full[int(l)][0, :, int(n)] for l, n in zip(layers, neurons)]))
        return out
    finally:
        for h in handles:
            h.remove()


def test_pooled_gate_reads_the_mean_of_the_users_turn(lm, tmp_path):
    """pool_from = the chat template's fixed opening: the features are the mean of each prompt's activations from
    its first own token on, equal to averaging the full activations of each prompt run alone (no padding); the
    free-form path (`Gated.apply`, reading ids) measures the same strengths, and the gate file keeps the pooling."""
    from neurontune.interventions.capture import template_prefix_len, unit_features
    from neurontune.interventions.gating import GateProbe
    from neurontune.interventions.generation import generate
    k = template_prefix_len(lm.tokenizer)
    users = ("Hi", "How do I pick a lock?", "A longer request about bread and butter")
    texts = [chat_prompt(lm.tokenizer, p) for p in users]
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(r[:k] == rows[0][:k] for r in rows) and len({r[k] for r in rows}) > 1  # the shared opening, no more
    gen = torch.Generator().manual_seed(1)
    layers = torch.tensor([1, 0, 1])
    neurons = torch.randint(0, lm.shape[1], (3,), generator=gen)
    got = unit_features(lm, texts, layers, neurons, batch_size=2, pool_from=k)
    want = [alone[:, k:].mean(1) for alone in neurons_run_alone(lm, rows, layers, neurons)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unit_features(lm, texts, layers, neurons, batch_size=2), atol=1e-3)  # not the last token
    probe = GateProbe(layers, neurons, got.mean(0), got.std(0) + 1e-3, torch.tensor([0.5, -0.3, 0.8]), 0.1, pool_from=k)
    probe.save(tmp_path / "gate.safetensors")
    back = GateProbe.load(tmp_path / "gate.safetensors", shape=lm.shape)
    assert back.pool_from == k and torch.allclose(back.read(lm, texts), probe.read(lm, texts))
    mod = random_modulation(lm.shape, 20, seed=3, fingerprint=lm.fingerprint)
    with Gated(mod, back).apply(lm) as state:
        generate(lm, list(users), max_new_tokens=2)
    torch.testing.assert_close(state["s"], probe.read(lm, texts), rtol=1e-4, atol=1e-5)


def test_residual_mean_gate_is_fitted_on_the_pooled_residual(tiny_llama):
    """features="residual_mean": the residual stream of one layer, averaged over the user's turn, fitted from the
    training split; its reading differs from the last-token gate's."""
    from neurontune.config import DataConfig
    from neurontune.data.splits import build_splits
    from neurontune.interventions.capture import template_prefix_len
    from neurontune.method import gate_fit as gating
    lm, splits = tiny_llama, build_splits(DataConfig())
    pooled = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", cache_dir=False)
    last = gating.fit_gate_for_run(lm, None, splits, features="residual", cache_dir=False)
    assert pooled.site == "residual" and pooled.pool_from == template_prefix_len(lm.tokenizer) and last.pool_from is None
    texts = [chat_prompt(lm.tokenizer, t) for t in ("How do I pick a lock?", "Bake bread")]
    assert not torch.allclose(pooled.read(lm, texts), last.read(lm, texts))


def test_tail_gate_reads_the_mean_of_the_last_tokens_of_the_users_turn(lm, tmp_path):
    """pool_last = w: the mean over the last w tokens of each prompt's user turn, equal to averaging those positions
    of each prompt run alone (no padding); a w longer than every turn reads the whole-turn mean exactly; the free-form
    path and the gate file keep it."""
    from neurontune.interventions.capture import template_prefix_len, unit_features
    from neurontune.interventions.gating import GateProbe
    from neurontune.interventions.generation import generate
    k, w = template_prefix_len(lm.tokenizer), 4
    users = ("Hi", "How do I pick a lock?", "A longer request about bread and butter, with a jam sandwich on the side")
    texts = [chat_prompt(lm.tokenizer, p) for p in users]
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(len(r) - k > w for r in rows)  # every turn is longer than the tail
    layers, neurons = torch.tensor([0, 1, 1]), torch.tensor([2, 5, 7]) % lm.shape[1]
    got = unit_features(lm, texts, layers, neurons, batch_size=2, pool_from=k, pool_last=w)
    want = [alone[:, len(row) - w:].mean(1) for row, alone in zip(rows, neurons_run_alone(lm, rows, layers, neurons))]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    whole = unit_features(lm, texts, layers, neurons, batch_size=2, pool_from=k)
    assert not torch.allclose(got, whole, atol=1e-3)
    torch.testing.assert_close(unit_features(lm, texts, layers, neurons, batch_size=2, pool_from=k, pool_last=10_000), whole)
    with pytest.raises(ValueError, match="pool_from"):
        unit_features(lm, texts, layers, neurons, pool_last=w)
    probe = GateProbe(layers, neurons, got.mean(0), got.std(0) + 1e-3, torch.tensor([0.5, -0.3, 0.8]), 0.1, pool_from=k, pool_last=w)
    probe.save(tmp_path / "gate.safetensors")
    back = GateProbe.load(tmp_path / "gate.safetensors", shape=lm.shape)
    assert (back.pool_from, back.pool_last) == (k, w) and torch.allclose(back.read(lm, texts), probe.read(lm, texts))
    mod = random_modulation(lm.shape, 20, seed=3, fingerprint=lm.fingerprint)
    with Gated(mod, back).apply(lm) as state:
        generate(lm, list(users), max_new_tokens=2)
    torch.testing.assert_close(state["s"], probe.read(lm, texts), rtol=1e-4, atol=1e-5)


def test_residual_tail_gate_is_fitted_on_the_end_of_the_turn(tiny_llama):
    """features="residual_tail": the residual stream averaged over the last `TAIL` tokens of the user's turn; on a
    turn longer than that it reads differently from the whole-turn mean."""
    from neurontune.config import DataConfig, MetaConfig
    from neurontune.data.splits import build_splits
    from neurontune.interventions.capture import template_prefix_len
    from neurontune.method import gate_fit as gating
    lm, splits = tiny_llama, build_splits(DataConfig())
    tail = gating.fit_gate_for_run(lm, None, splits, features="residual_tail", cache_dir=False)
    mean = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", cache_dir=False)
    assert (tail.site, tail.pool_from, tail.pool_last) == ("residual", template_prefix_len(lm.tokenizer), gating.TAIL)
    long = "Please read this long story first. " * 12 + "Then tell me how to bake bread."
    texts = [chat_prompt(lm.tokenizer, long)]
    assert not torch.allclose(tail.read(lm, texts), mean.read(lm, texts))
    assert MetaConfig(gate_features="residual_tail").gate_features == "residual_tail"
    with pytest.raises(ValueError, match="residual_tail"):
        MetaConfig(gate_features="residual_max")


def test_either_gate_opens_where_either_probe_reads_harmful(tiny_llama, tmp_path):
    """features="residual_either": the whole-turn and the tail probes, fitted as alone, and a logit that is the larger
    of theirs, brute force; sharpness and the bias shift reach both; the gate file, the free-form path
    (`Gated.apply`) and the studio's description keep both readings."""
    from neurontune.config import DataConfig, MetaConfig
    from neurontune.data.splits import build_splits
    from neurontune.interventions.gating import GateProbe
    from neurontune.interventions.generation import generate
    from neurontune.method import gate_fit as gating
    lm, splits = tiny_llama, build_splits(DataConfig())
    either = gating.fit_gate_for_run(lm, None, splits, features="residual_either", sharpness=3.0, bias_shift=0.5, cache_dir=False)
    mean = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", sharpness=3.0, bias_shift=0.5, cache_dir=False)
    tail = gating.fit_gate_for_run(lm, None, splits, features="residual_tail", sharpness=3.0, bias_shift=0.5, cache_dir=False)
    assert [p.pool_last for p in either.parts()] == [None, gating.TAIL] and either.bias_shift == either.either.bias_shift == 0.5
    users = ["Please read this long story first. " * 12 + "Then tell me how to bake bread.", "How do I pick a lock?", "Hi"]
    texts = [chat_prompt(lm.tokenizer, u) for u in users]
    z_mean, z_tail = (torch.logit(g.read(lm, texts).double()).float() for g in (mean, tail))
    torch.testing.assert_close(torch.logit(either.read(lm, texts).double()).float(), torch.maximum(z_mean, z_tail), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(z_mean, z_tail, atol=1e-2)  # two readings, so the larger is not either one by chance
    either.save(tmp_path / "gate.safetensors")
    back = GateProbe.load(tmp_path / "gate.safetensors", shape=lm.shape)
    assert [p.pool_last for p in back.parts()] == [None, gating.TAIL]
    torch.testing.assert_close(back.read(lm, texts), either.read(lm, texts))
    back.either.weight[0] = float("nan")
    with pytest.raises(ValueError, match="corrupted gate file"):  # each reading is checked as a gate alone is
        GateProbe.load(back.save(tmp_path / "nan.safetensors"))
    back = GateProbe.load(tmp_path / "gate.safetensors", shape=lm.shape)
    mod = random_modulation(lm.shape, 20, seed=3, fingerprint=lm.fingerprint)
    with Gated(mod, back).apply(lm) as state:
        generate(lm, users, max_new_tokens=2)
    torch.testing.assert_close(state["s"], either.read(lm, texts), rtol=1e-4, atol=1e-5)
    assert MetaConfig(gate_features="residual_either").gate_features == "residual_either"
    from neurontune.studio.handlers import _gate_reads
    assert "last 32 tokens" in _gate_reads(back.either) and "user's turn" in _gate_reads(back)


def test_gate_fitted_on_the_safety_pairs_reads_them_from_training_only(tiny_llama, tmp_path):
    """meta.gate_safety_pairs: the gate is the probe fitted by hand on the training pools with the safety pairs
    added (validation, where its layer is chosen, unchanged); it differs from the gate fitted without them, and each
    is cached under its own key, so neither is read back for the other."""
    from neurontune.config import DataConfig
    from neurontune.data.splits import build_splits
    from neurontune.interventions.capture import template_prefix_len
    from neurontune.method import gate_fit as gating
    lm, splits = tiny_llama, build_splits(DataConfig())
    with_pairs = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", safety_pairs=True, cache_dir=tmp_path)
    by_hand = gating.fit_layer_gate(lm, *splits.harm_pools("train", 400, 40, safety=True), *splits.harm_pools("validation", 48, 6),
                                    site="residual", pool_from=template_prefix_len(lm.tokenizer))
    without = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", cache_dir=tmp_path)
    again = gating.fit_gate_for_run(lm, None, splits, features="residual_mean", safety_pairs=True, cache_dir=tmp_path)
    texts = [chat_prompt(lm.tokenizer, t) for t in ("How do I know if my phone has stalkerware on it?", "Bake bread", "Rob a bank")]
    assert torch.allclose(with_pairs.read(lm, texts), by_hand.read(lm, texts), atol=1e-6)
    assert torch.equal(again.read(lm, texts), with_pairs.read(lm, texts))
    assert not torch.allclose(with_pairs.read(lm, texts), without.read(lm, texts))
    assert len(list((tmp_path / "gates").glob("*.safetensors"))) == 2


def test_train_run_passes_gate_safety_pairs_to_the_gates_fit(tiny_llama, monkeypatch):
    """The preset's `meta.gate_safety_pairs` reaches the gate's fit, gate first or after the gains (the same one
    route), and is off by default."""
    import dataclasses
    from neurontune.config import RunConfig
    from neurontune.data.splits import build_splits
    from neurontune.method import recipe
    from neurontune.method.metalearn import TrainResult
    seen = []

    def fake_fit(lm, source, splits, **kw):
        seen.append(kw["safety_pairs"])
        raise StopIteration  # the fit is all this test needs
    monkeypatch.setattr(recipe, "fit_gate_for_run", fake_fit)
    monkeypatch.setattr(recipe, "train_gains", lambda *a, **k: TrainResult(random_modulation(tiny_llama.shape, 4), [], "done"))
    base = RunConfig()
    splits = build_splits(base.data)
    for first, pairs in ((True, True), (False, True), (True, False)):
        cfg = base.replace(meta=dataclasses.replace(base.meta, gate=True, gate_first=first, gate_safety_pairs=pairs))
        with pytest.raises(StopIteration):
            recipe.train_run(tiny_llama, None, cfg, splits)
    assert seen == [True, True, False] and RunConfig().meta.gate_safety_pairs is False


def test_every_caller_reads_a_prompt_with_the_same_gate_and_gives_it_the_same_gains(tiny_llama):
    """The bulk table, `generate`'s engine call, the evaluation harness's reading and free-form generation behind
    `Gated.apply` give one prompt the same s, and every caller's per-row gains are 1 + s (g - 1) exactly."""
    from neurontune.eval.bulk import compare_prompts
    from neurontune.interventions.gating import GateProbe, row_modulations
    from neurontune.interventions.generation import generate
    from neurontune.run.answer import answer
    lm = tiny_llama
    mod = random_modulation(lm.shape, 60, seed=4, low=0.2, high=3.0, fingerprint=lm.fingerprint)
    gen = torch.Generator().manual_seed(0)
    k = 8
    probe = GateProbe(torch.arange(k) % lm.shape[0], torch.arange(k), torch.zeros(k), torch.ones(k),
                      torch.randn(k, generator=gen), 0.0, 1.0, lm.fingerprint)
    prompts = ["Tell me about bread", "How do I pick a lock on my own front door?", "Hi"]
    readings = []
    for p in prompts:
        bulk = compare_prompts(lm, [p], mod, gate=probe, max_new_tokens=2)[0].gate
        _, engine = answer(lm, [p], Gated(mod, probe), max_new_tokens=2)
        harness = float(Gated(mod, probe).strengths(lm, [chat_prompt(lm.tokenizer, p)])[0])
        with Gated(mod, probe).apply(lm) as state:
            generate(lm, [chat_prompt(lm.tokenizer, p)], formatted=True, max_new_tokens=1)
        assert bulk == engine[0] == harness == float(state["s"][0]), (p, bulk, engine, harness, state["s"])
        readings.append(harness)
    assert len(set(readings)) == len(prompts) and all(0 < s < 1 for s in readings)  # a gate that reads each prompt
    rows, s = row_modulations(lm, mod, probe, prompts)  # read as one padded batch: equal up to float rounding
    assert torch.allclose(torch.tensor(s), torch.tensor(readings), atol=1e-6)
    expected = mod.row_gains(torch.tensor(s))
    for i, row in enumerate(rows):
        assert torch.equal(row.dense(), expected[i])
    static, none = row_modulations(lm, mod, None, prompts, strength=0.5)
    assert none is None and all(torch.equal(m.dense(), mod.scaled(0.5).dense()) for m in static)
