"""Modulation algebra on the tiny models: identity, ablation, scoping, per-row gains, thread isolation,
folding into weights and the modulation file format."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import ablation_hooks, encode, hooks_left, logits, random_modulation

from neurontune.interventions.generation import generate, stream_generate
from neurontune.interventions.modulation import (
    Modulation,
    ModulationFileError,
    fold_into_weights,
    modulate,
)
from neurontune.model.loading import fingerprint
from neurontune.run.folder import RunFolder

P0, P1 = "The quick brown fox jumps", "A lazy dog sleeps all day"  # same byte count: no padding needed


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- identity and ablation ---------------------------------------------------------------------------
def test_gain_one_is_bit_identical(lm):
    ids = encode(lm, P0, P1)
    base = logits(lm, ids)
    shape = lm.shape
    with modulate(lm.model, torch.ones(shape), lm.nmap):
        assert torch.equal(logits(lm, ids), base)
    with modulate(lm.model, Modulation(shape), lm.nmap):
        assert torch.equal(logits(lm, ids), base)
    with modulate(lm.model, [None, None], lm.nmap):
        assert torch.equal(logits(lm, ids), base)
    # A trainable all-ones table does install hooks on every layer: multiplying by 1.0 must be exact too.
    ones = torch.ones(shape, requires_grad=True)
    with modulate(lm.model, ones, lm.nmap):
        assert hooks_left(lm) == lm.nmap.n_layers
        assert torch.equal(logits(lm, ids), base)
    # An explicit Modulation whose listed gains are all 1.
    explicit = Modulation(shape, {0: (torch.tensor([1, 5]), torch.ones(2))})
    with modulate(lm.model, [explicit, None], lm.nmap):
        assert torch.equal(logits(lm, ids), base)


def test_gain_zero_equals_explicit_ablation(lm):
    ids = encode(lm, P0, P1)
    neurons = {0: [3, 17, 40], lm.nmap.n_layers - 1: [0, 9, 100, 127]}
    mod = Modulation(lm.shape, {l: (torch.tensor(i), torch.zeros(len(i))) for l, i in neurons.items()})
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    handles = ablation_hooks(lm, neurons)
    try:
        ablated = logits(lm, ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(hooked, ablated)
    assert _max_diff(hooked, logits(lm, ids)) > 1e-4  # the ablation really changes the output


def test_nested_blocks_compose(lm):
    ids = encode(lm, P0)
    a, b = random_modulation(lm.shape, 60, seed=1), random_modulation(lm.shape, 60, seed=2)
    with modulate(lm.model, a, lm.nmap), modulate(lm.model, b, lm.nmap):
        nested = logits(lm, ids)
    with modulate(lm.model, a.dense() * b.dense(), lm.nmap):
        product = logits(lm, ids)
    assert torch.allclose(nested, product, atol=1e-5, rtol=0)


# -- scoping ---------------------------------------------------------------------------------------
def test_hooks_removed_after_block_and_after_exception(lm):
    ids = encode(lm, P0, P1)
    base = logits(lm, ids)
    mod = random_modulation(lm.shape, 100, seed=3)
    with modulate(lm.model, mod, lm.nmap):
        assert hooks_left(lm) > 0
        inside = logits(lm, ids)
    assert _max_diff(inside, base) > 1e-4
    assert hooks_left(lm) == 0
    assert torch.equal(logits(lm, ids), base)

    with pytest.raises(RuntimeError, match="boom"):
        with modulate(lm.model, mod, lm.nmap):
            logits(lm, ids)
            raise RuntimeError("boom")
    assert all(len(p._forward_pre_hooks) == 0 for p in lm.nmap.projections)
    assert torch.equal(logits(lm, ids), base)


def test_wrong_shape_refused(lm):
    with pytest.raises(ValueError, match="do not fit"):
        with modulate(lm.model, torch.ones(lm.shape[0] + 1, lm.shape[1]), lm.nmap):
            pass
    assert hooks_left(lm) == 0


# -- per batch row -----------------------------------------------------------------------------------
def test_per_row_gains_match_separate_runs(lm):
    ids = encode(lm, P0, P1)
    mod = random_modulation(lm.shape, 120, seed=4)
    with modulate(lm.model, [None, mod], lm.nmap):
        both = logits(lm, ids)
    alone0 = logits(lm, ids[:1])
    with modulate(lm.model, mod, lm.nmap):
        alone1 = logits(lm, ids[1:])
    assert torch.allclose(both[0], alone0[0], atol=1e-5, rtol=0)
    assert torch.allclose(both[1], alone1[0], atol=1e-5, rtol=0)
    assert _max_diff(alone1[0], logits(lm, ids[1:])[0]) > 1e-4  # row 1 really is modulated


def test_per_row_gains_wrong_batch_refused(lm):
    ids = encode(lm, P0, P1)
    with pytest.raises(ValueError, match="rows"):
        with modulate(lm.model, [None, None, random_modulation(lm.shape, 5)], lm.nmap):
            logits(lm, ids)
    assert hooks_left(lm) == 0


# -- thread isolation ------------------------------------------------------------------------------
def test_threads_never_see_each_others_gains(lm):
    ids = encode(lm, P0, P1)
    mods = [random_modulation(lm.shape, 150, seed=10), random_modulation(lm.shape, 150, seed=11, low=1.0, high=3.0), None]
    refs = []
    for m in mods:
        with modulate(lm.model, m, lm.nmap):
            refs.append(logits(lm, ids))
    for i in range(3):  # the three references are far apart, so a leak would be seen
        for j in range(i):
            assert _max_diff(refs[i], refs[j]) > 1e-3

    barrier, failures = threading.Barrier(3), []

    def worker(k: int) -> None:
        try:
            with modulate(lm.model, mods[k], lm.nmap):
                barrier.wait(timeout=30)
                for step in range(20):
                    out = logits(lm, ids)
                    if not torch.allclose(out, refs[k], atol=1e-5, rtol=0):
                        failures.append((k, step, _max_diff(out, refs[k])))
        except BaseException as exc:  # reported below, never swallowed
            failures.append((k, "error", repr(exc)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    assert hooks_left(lm) == 0


def test_generate_isolated_between_threads(lm):
    prompts = ["Tell me a story", "How are you?"]
    mod = random_modulation(lm.shape, lm.shape[0] * lm.shape[1] // 2, seed=12, low=0.0, high=0.2)
    ref_base = generate(lm, prompts, max_new_tokens=10)
    ref_mod = generate(lm, prompts, mod, max_new_tokens=10)
    assert ref_base != ref_mod
    convs = [[{"role": "user", "content": p}] for p in prompts]
    barrier, results, failures = threading.Barrier(3), {}, []

    def run(name: str, fn) -> None:
        try:
            barrier.wait(timeout=30)
            results[name] = [fn() for _ in range(3)]
        except BaseException as exc:
            failures.append((name, repr(exc)))

    jobs = {
        "base": lambda: generate(lm, prompts, max_new_tokens=10),
        "mod": lambda: generate(lm, prompts, mod, max_new_tokens=10),
        "stream_mod": lambda: list(stream_generate(lm, convs, mod, max_new_tokens=10))[-1],
    }
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert results["base"] == [ref_base] * 3
    assert results["mod"] == [ref_mod] * 3
    assert results["stream_mod"] == [ref_mod] * 3
    assert hooks_left(lm) == 0


def test_stream_generate_per_row_and_caller_scope(lm):
    prompts = ["Tell me a story", "How are you?"]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    mod = random_modulation(lm.shape, lm.shape[0] * lm.shape[1] // 2, seed=12, low=0.0, high=0.2)
    per_row = list(stream_generate(lm, convs, [None, mod], max_new_tokens=10))
    assert per_row[-1] == generate(lm, prompts, [None, mod], max_new_tokens=10)
    assert len(per_row) > 2 and all(len(step) == 2 for step in per_row)  # several partial updates, one text per row
    # A modulation opened by the caller applies inside stream_generate's worker thread.
    with modulate(lm.model, mod, lm.nmap):
        inside = list(stream_generate(lm, convs, max_new_tokens=10))[-1]
    assert inside == generate(lm, prompts, mod, max_new_tokens=10)


# -- folding -----------------------------------------------------------------------------------------
def test_fold_reproduces_hooked_logits(lm):
    ids = encode(lm, P0, P1)
    mod = random_modulation(lm.shape, 150, seed=5)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    folded = fold_into_weights(copy.deepcopy(lm.model), mod)
    plain = logits(lm, ids, model=folded)
    assert _max_diff(plain, hooked) < 1e-4
    assert _max_diff(hooked, logits(lm, ids)) > 1e-3  # the modulation matters, the original is untouched


def test_fold_changes_fingerprint(lm):
    from neurontune.model.neuron_map import neuron_map
    mod = Modulation(lm.shape, {0: (torch.arange(64), torch.full((64,), 1.5))})
    folded = fold_into_weights(copy.deepcopy(lm.model), mod)
    assert fingerprint(folded, neuron_map(folded)) != lm.fingerprint
    assert fingerprint(lm.model, lm.nmap) == lm.fingerprint


def test_fold_per_row_refused(lm):
    with pytest.raises(ValueError, match="[Pp]er-row"):
        fold_into_weights(copy.deepcopy(lm.model), [None, random_modulation(lm.shape, 5)])


# -- files and algebra ---------------------------------------------------------------------------------
def test_save_load_round_trip(lm, tmp_path):
    mod = random_modulation(lm.shape, 77, seed=6, fingerprint=lm.fingerprint)
    mod.meta = {"kind": "test", "steps": 3}
    path = mod.save(tmp_path / "sub" / "modulation.safetensors")
    back = Modulation.load(path, expected_fingerprint=lm.fingerprint)
    assert back.shape == mod.shape and back.fingerprint == mod.fingerprint and back.meta == mod.meta
    assert torch.equal(back.dense(), mod.dense())
    assert back.n_modulated == 77
    assert torch.equal(RunFolder(tmp_path / "sub").modulation().dense(), mod.dense())  # a run folder finds its file
    with pytest.raises(ModulationFileError, match="is a folder"):
        Modulation.load(tmp_path / "sub")
    ids = encode(lm, P0)
    with modulate(lm.model, mod, lm.nmap):
        a = logits(lm, ids)
    with modulate(lm.model, back, lm.nmap):
        b = logits(lm, ids)
    assert torch.equal(a, b)


def test_load_refuses_other_model(lm, tmp_path):
    path = random_modulation(lm.shape, 10, fingerprint=lm.fingerprint).save(tmp_path / "m.safetensors")
    with pytest.raises(ModulationFileError, match="made for model"):
        Modulation.load(path, expected_fingerprint="0123456789abcdef")


def test_load_refuses_truncated_missing_and_foreign_files(lm, tmp_path):
    path = random_modulation(lm.shape, 50).save(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModulationFileError, match="not a readable modulation file"):
        Modulation.load(truncated)
    with pytest.raises(ModulationFileError, match="No modulation file"):
        Modulation.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModulationFileError, match="not a NeuronTune modulation"):
        Modulation.load(foreign)


def test_scaled_strength(lm):
    mod = random_modulation(lm.shape, 90, seed=7)
    assert torch.equal(mod.scaled(1.0).dense(), mod.dense())
    assert torch.equal(mod.scaled(0.0).dense(), torch.ones(lm.shape))
    half = mod.scaled(0.5).dense()
    assert torch.allclose(half, 1 + 0.5 * (mod.dense() - 1))
    ids = encode(lm, P0)
    base = logits(lm, ids)
    with modulate(lm.model, mod.scaled(0.0), lm.nmap):
        assert torch.equal(logits(lm, ids), base)
    with modulate(lm.model, mod.scaled(1.0), lm.nmap):
        scaled_one = logits(lm, ids)
    with modulate(lm.model, mod, lm.nmap):
        assert torch.equal(logits(lm, ids), scaled_one)


def test_from_dense_round_trip_and_summary(lm):
    mod = random_modulation(lm.shape, 40, seed=8, low=0.0, high=2.0)
    again = Modulation.from_dense(mod.dense())
    assert torch.equal(again.dense(), mod.dense())
    s = mod.summary()
    assert s["n_modulated"] == 40 == s["n_amplified"] + s["n_suppressed"]
    assert 0.0 <= s["min_gain"] <= s["max_gain"] <= 2.0


# -- cost per decoding step ------------------------------------------------------------------------------
class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the operators run inside the block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_gain_hook_is_one_multiply_per_step(per_row):
    """After its first call on a (device, dtype), the hook runs exactly one operator per call, the multiply:
    no copy, cast, reshape or repeat of the gains per decoding step. The result equals x * gains."""
    from neurontune.interventions.modulation import _gain_hook
    g = torch.linspace(0.5, 1.5, 16)
    gains = torch.stack([g, 2 * g, torch.ones(16)]) if per_row else g
    hook = _gain_hook(gains, per_row)
    x = torch.randn(3, 1, 16, dtype=torch.bfloat16)  # a decoding step: one new position per row
    hook(None, (x,))  # the first call prepares the gains for this device and dtype
    with _Ops() as ops:
        outs = [hook(None, (x,))[0] for _ in range(5)]
    assert ops.names == ["aten.mul.Tensor"] * 5, ops.names
    want = x * (gains.to(torch.bfloat16)[:, None, :] if per_row else gains.to(torch.bfloat16))
    assert all(torch.equal(o, want) for o in outs)


def test_fold_rounds_once_in_the_weight_dtype(lm):
    """In bfloat16 the folded weight is the float32 product of the original weight and the gains, rounded
    once; rounding the gains to bfloat16 first (a second rounding) gives different weights."""
    from neurontune.interventions.modulation import folded_weight
    half = copy.deepcopy(lm.model).to(torch.bfloat16)
    mod = random_modulation(lm.shape, 300, seed=12, low=0.3, high=2.7)
    folded = fold_into_weights(half, mod)
    w0 = lm.nmap.weight_slice(1).detach().to(torch.bfloat16)  # the bf16 original of layer 1
    from neurontune.model.neuron_map import neuron_map
    w1 = neuron_map(folded).weight_slice(1)
    g = mod.dense()[1]
    assert torch.equal(w1, (w0.float() * g[:, None]).to(torch.bfloat16))
    assert torch.equal(w1, folded_weight(w0, g))
    assert not torch.equal(w1, w0 * g.to(torch.bfloat16)[:, None])  # the double rounding the fold avoids
