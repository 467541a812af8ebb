"""Shared fixtures: the two tiny random models (session-scoped) and small helpers the test files import."""
from __future__ import annotations

import contextlib
import os
import socket

# Tests never download: an unknown hub id must fail at once instead of retrying the network for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# On a small shared box (2 cores), intra-op threads oversubscribe the CPU, worst of all in the tests that run
# several model threads at once: one thread per forward is several times faster there. OMP_NUM_THREADS wins.
if (os.cpu_count() or 1) <= 2 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

from neurontune.infra.progress import Reporter
from neurontune.interventions.modulation import Modulation
from neurontune.model.loading import LoadedModel, load_model

TINY_FIXTURES = ("tiny_llama", "tiny_gpt2")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    return load_model("tiny-gpt2")


@pytest.fixture(params=TINY_FIXTURES)
def lm(request) -> LoadedModel:
    """Each tiny architecture in turn (LLaMA: down_proj Linear; GPT-2: c_proj Conv1D)."""
    return request.getfixturevalue(request.param)


# -- helpers ---------------------------------------------------------------------------------------
class Recorder(Reporter):
    """A reporter that keeps what it is told: `calls` (done, total, stage), `steps`, `said`, `phases`; cancelled
    once `cancel` (an Event, when given) is set."""

    def __init__(self, cancel=None):
        super().__init__(cancel)
        self.calls, self.steps, self.said, self.phases = [], [], [], []

    def phase(self, name, total=None):
        self.phases.append((name, total))

    def progress(self, done, total, stage=""):
        self.calls.append((done, total, stage))

    def step(self, entry):
        self.steps.append(entry)

    def say(self, message):
        self.said.append(message)


def encode(lm: LoadedModel, *texts: str) -> torch.Tensor:
    """Token ids [B, T] of texts that tokenise to the same length (no padding, so rows are independent)."""
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 1, f"test prompts must have equal token counts: {[len(r) for r in rows]}"
    return torch.tensor(rows)


@torch.no_grad()
def logits(lm: LoadedModel, ids: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
    """Plain forward logits [B, T, vocab] (no cache, no padding)."""
    return (model or lm.model)(input_ids=ids, use_cache=False).logits


def random_modulation(shape: tuple[int, int], n: int, seed: int = 0, low: float = 0.0, high: float = 2.0,
                      fingerprint: str | None = None) -> Modulation:
    """`n` distinct random neurons with gains uniform in [low, high)."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.ones(shape)
    flat = torch.randperm(shape[0] * shape[1], generator=gen)[:n]
    dense.view(-1)[flat] = low + (high - low) * torch.rand(n, generator=gen)
    return Modulation.from_dense(dense, fingerprint)


def ablation_hooks(lm: LoadedModel, neurons: dict[int, list[int]]):
    """Register plain (unscoped) pre-hooks zeroing the given input units of each output projection.
    Returns the handles; the caller removes them."""
    handles = []
    for layer, idx in neurons.items():
        def hook(module, args, idx=torch.tensor(idx)):
            x = args[0].clone()
            x[..., idx] = 0
            return (x, *args[1:])
        handles.append(lm.nmap.projections[layer].register_forward_pre_hook(hook))
    return handles


def hooks_left(lm: LoadedModel) -> int:
    return sum(len(p._forward_pre_hooks) for p in lm.nmap.projections)


@contextlib.contextmanager
def served_studio(model: str, preset: str, tmp, **studio_kwargs):
    """A studio serving `model` on a free 127.0.0.1 port, its runs and exports under `tmp` (and its cache,
    unless `cache_dir=None` is passed: the user's cache). Yields (studio, url with a trailing slash)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from neurontune.studio import Studio, launch

    kwargs = {"cache_dir": tmp / "cache", "runs_dir": tmp / "runs", "export_root": tmp / "exports", **studio_kwargs}
    studio = Studio(model, preset, **kwargs)
    studio.models.get(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, _ = launch(studio, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield studio, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        studio.runner.shutdown()
