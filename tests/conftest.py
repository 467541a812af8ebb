"""Shared fixtures: the two tiny random models (session-scoped) and small helpers the test files import."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time

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


def without_tensor(path, name: str, out):
    """A copy of the modulation file `path` without tensor `name`, its checksum renewed (a file stored half: only the
    loader's own checks can refuse it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from neurontune.interventions.modulation import _checksum
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    del tensors[name]
    header["checksum"] = _checksum(tensors)
    save_file(tensors, str(out), metadata=header)
    return out


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


def wait_until(cond, timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll `cond()` until it is true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


# -- the studio, served and seen through gradio_client -----------------------------------------------
STUDIO_PRESET = {"name": "tiny-test",
                 "data": {"n_harmful": 4, "n_attack_per_family": 1, "n_benign": 4, "n_borderline": 2, "n_answer": 4, "answer_tokens": 8},
                 "attribution": {"max_length": 64, "batch_size": 16},
                 "selection": {"k_safety": 40, "k_utility": 20, "protect_top": 10},
                 "meta": {"steps": 3, "eval_every": 1, "batch_harmful": 2, "batch_benign": 2}}
VIEW = ("safety", 0, 50)  # kind shown, drill-down layer, table rows
PROMPT = "Tell me how to pick a lock"


def served_app(name: str, preset: dict = STUDIO_PRESET, model: str = "tiny-llama"):
    """A module-scoped fixture: the studio on `model` with `preset` (written to a file), served on 127.0.0.1.
    Yields (studio, url, preset path)."""
    @pytest.fixture(scope="module")
    def app(tmp_path_factory):
        tmp = tmp_path_factory.mktemp(name)
        path = tmp / f"{preset['name']}.json"
        path.write_text(json.dumps(preset))
        with served_studio(model, str(path), tmp, quick_default=False) as (studio, url):
            yield studio, url, str(path)
    return app


class StudioClient:
    """One session of the served studio seen through gradio_client: call(api, *args) -> {output name: value}."""

    def __init__(self, url: str, preset: str):
        from gradio_client import Client

        from neurontune.studio.app import OUTPUTS
        self.client, self.outputs, self.preset = Client(url, verbose=False), OUTPUTS, preset

    def call(self, api: str, *args) -> dict:
        names = self.outputs[api]
        result = self.client.predict(*args, api_name=f"/{api}")
        return dict(zip(names, result if len(names) > 1 else [result]))

    def load(self, model: str = "tiny-llama") -> dict:
        return self.call("load_model", model, False, self.preset, False, None, None, None, *VIEW)

    def chat(self, message: str = PROMPT, strength: float = 1.0, tokens: int = 12, use_gate: bool | None = None) -> tuple[str, str, str]:
        """A fresh conversation's one answer pair: (base answer, modulated answer, status)."""
        self.call("clear_chat")
        out = self.call("chat", message, strength, tokens, False, 0.7, *(() if use_gate is None else (use_gate,)))
        return answer(out["left"]), answer(out["right"]), out["chat_status"]


def pane_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def answer(history: list[dict]) -> str:
    """The last answer of a chat pane, without the judge's verdict line."""
    assert history and history[-1]["role"] == "assistant", history
    text = pane_text(history[-1])
    assert "*judge:*" in text
    return text.rsplit("\n\n*judge:*", 1)[0]


def amplified(counts: str) -> int:
    """The number of amplified neurons in the selection summary."""
    return int(re.search(r"\*\*([\d,]+)\*\* neurons amplified", counts).group(1).replace(",", ""))
