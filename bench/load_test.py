"""Many users at once: N concurrent gradio_client sessions on the studio (127.0.0.1) for M minutes.

The app runs as `python app.py` while one session's training job runs in the background; the report
gives latency (p50/p95), errors, cross-session leaks, peak memory of the app and requests done.

    python bench/load_test.py [--model embedded|tiny-llama] [--sessions 8] [--minutes 3] [--json OUT]

Each simulated user is its own `gradio_client.Client` (its own Gradio session) with its own selection and
fixed gains. It loops: slider moves (`/select`), side-by-side chats (`/chat`, streamed, greedy) alternating
strength 1 and 0, now and then re-applying its gains; one user exports once. Every answer is checked
against what the engine gives for *that user's* gains, computed here beforehand with the same model,
scores and batched call: the modulated pane must equal it (strength 1) or the base answer (strength 0), and
the base pane must equal the base answer. A mismatch counts as a cross-session leak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_SESSIONS, MAX_MINUTES = 16, 10  # hard caps, whatever the flags say
VIEW = ("safety", 0, 50)  # kind shown, drill-down layer, table rows
PROMPTS = ("Write a short poem about the sea.", "Give me three tips for a job interview.")
SHARED_CACHE = ("models", "attribution", "answers", "eval_base")  # reused read-mostly; job files stay private


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(update):
    """A slider's value from what gradio_client returns for `gr.update(...)` (a dict) or a plain value."""
    return update.get("value") if isinstance(update, dict) else update


def text_of(message: dict) -> str:
    content = message.get("content", "")
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content if isinstance(p, dict))


def answer(history) -> str | None:
    """The last answer of a chat pane without the judge's verdict line (None: no answer)."""
    if not history or history[-1].get("role") != "assistant":
        return None
    return text_of(history[-1]).rsplit("\n\n*judge:*", 1)[0]


def amplified_suppressed(counts: str) -> tuple[int, int] | None:
    m = re.search(r"\*\*([\d,]+)\*\* neurons amplified.*?\*\*([\d,]+)\*\* suppressed", counts or "")
    return (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) if m else None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- the app process and its memory --------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            tree[ppid].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return tree


def process_tree(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


def status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, p = parts[1].split(":")
            if parts[3] == "0A" and int(p, 16) == port:
                found.add({"0100007F": "127.0.0.1", "00000000": "0.0.0.0"}.get(addr, addr))
    return found


class App:
    """`python app.py` on 127.0.0.1 with private runs/exports/job folders under `work`."""

    def __init__(self, model: str, preset: str, work: Path, shared_cache: Path):
        self.work, self.port = work, free_port()
        self.cache = work / "cache"
        self.cache.mkdir(parents=True)
        for sub in SHARED_CACHE:  # the dequantised model and cached scores/answers: not recomputed here
            (shared_cache / sub).mkdir(parents=True, exist_ok=True)
            (self.cache / sub).symlink_to(shared_cache / sub)
        (work / "tmp").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT")}
        env.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_SHARE="False", HF_HUB_OFFLINE="1",
                   GRADIO_TEMP_DIR=str(work / "tmp"), TMPDIR=str(work / "tmp"))
        self.log_path = work / "app.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", model, "--preset", preset, "--host", "127.0.0.1",
             "--port", str(self.port), "--cache-dir", str(self.cache), "--runs-dir", str(work / "runs"),
             "--export-root", str(work / "exports")], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.rss_peak_kb, self.rss_samples = 0, []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            rss = sum(status_kb(p, "VmRSS") for p in process_tree(self.proc.pid))
            self.rss_peak_kb = max(self.rss_peak_kb, rss)
            self.rss_samples.append((time.time(), rss, os.getloadavg()[0]))
            self._stop.wait(1.0)

    def wait_ready(self, timeout: float = 600) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"the app did not serve its page in {timeout:.0f} s:\n{self.log_tail()}")

    def hwm_kb(self) -> int:
        """Peak resident memory of the app and its live children (kernel's high-water mark)."""
        return sum(status_kb(p, "VmHWM") for p in process_tree(self.proc.pid))

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def tracebacks(self) -> list[str]:
        """The last line of every traceback the app logged (server-side errors)."""
        self.log.flush()
        lines, out = self.log_path.read_text(errors="replace").splitlines(), []
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                    j += 1
                out.append(lines[j] if j < len(lines) else line)
        return out

    def close(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# -- one simulated user ---------------------------------------------------------------------------
@dataclass
class Spec:
    """One user's own selection and fixed gains, and the answers the engine gives for them."""
    k_safety: int
    k_utility: int
    protect_top: int
    safety_gain: float
    utility_gain: float
    counts: tuple[int, int] = (0, 0)
    expected: dict = field(default_factory=dict)  # prompt -> modulated answer at strength 1


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.requests: Counter = Counter()
        self.errors: list[str] = []
        self.leaks: list[str] = []
        self.checked = 0

    def request(self, kind: str, seconds: float | None = None, n: int = 1) -> None:
        with self.lock:
            if n:
                self.requests[kind] += n
            if seconds is not None:
                self.latency[kind].append(seconds)

    def error(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg[:400])

    def check(self, ok: bool, msg: str) -> None:
        with self.lock:
            self.checked += 1
            if not ok:
                self.leaks.append(msg[:600])


class User:
    def __init__(self, url: str, downloads: Path, timeout: float):
        from gradio_client import Client

        from neurontune.studio.app import OUTPUTS
        self.client = Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads))
        self.outputs, self.timeout = OUTPUTS, timeout

    def call(self, api: str, *args, timeout: float | None = None) -> dict:
        names = self.outputs[api]
        result = self.client.submit(*args, api_name=f"/{api}").result(timeout=timeout or self.timeout)
        return dict(zip(names, result if len(names) > 1 else [result]))

    def chat(self, message: str, strength: float, tokens: int) -> tuple[dict, float | None, float | None, float]:
        """Streamed chat: (final outputs, seconds to the first non-empty modulated update, seconds waiting in
        Gradio's queue before processing started, total seconds), all from the submit."""
        from gradio_client.utils import Status

        started_codes = {Status.PROCESSING, Status.ITERATING, Status.PROGRESS, Status.FINISHED}
        start = time.perf_counter()
        job = self.client.submit(message, strength, tokens, False, 0.7, api_name="/chat")
        first, queued, seen = None, None, 0
        while True:
            if queued is None and job.status().code in started_codes:
                queued = time.perf_counter() - start
            outs = job.outputs()
            if first is None:
                for out in outs[seen:]:
                    right = answer(out[1]) if isinstance(out, (list, tuple)) and len(out) > 1 else None
                    if right and right.strip() and right != "…":
                        first = time.perf_counter() - start
                        break
                seen = len(outs)
            if job.done():
                break
            if time.perf_counter() - start > self.timeout:
                job.cancel()
                raise TimeoutError(f"chat took over {self.timeout:.0f} s")
            time.sleep(0.01)
        result = job.result(timeout=10)
        return dict(zip(self.outputs["chat"], result)), first, queued, time.perf_counter() - start


def setup_user(user: User, spec: Spec) -> None:
    """Open the page, load the (cached) scores, select this user's neurons and apply its fixed gains."""
    out = user.call("on_load", *VIEW)
    if not str(out.get("model_status", "")).startswith("✓"):
        raise RuntimeError(f"page open failed: {out.get('model_status')}")
    out = user.call("attribute", *VIEW)
    if "cache" not in out["attr_status"] and "done" not in out["attr_status"]:
        raise RuntimeError(f"scores not loaded: {out['attr_status']}")
    out = user.call("select", spec.k_safety, spec.k_utility, spec.protect_top, *VIEW)
    if amplified_suppressed(out["counts"]) != spec.counts:
        raise RuntimeError(f"the app selected {out['counts'][:120]!r}, the reference {spec.counts}")
    apply_gains(user, spec)


def apply_gains(user: User, spec: Spec) -> dict:
    out = user.call("fixed_gains", spec.safety_gain, spec.utility_gain, *VIEW)
    if f"fixed gains ×{spec.safety_gain:g} / ×{spec.utility_gain:g}" not in out.get("gains_status", ""):
        raise RuntimeError(f"gains not applied: {out.get('gains_status')}")
    return out


def simulate(i: int, user: User, spec: Spec, base: dict, ctx: dict, stats: Stats) -> None:
    """One user's loop until the deadline: drag the sliders, chat (strength 1, then 0), re-apply the gains
    now and then, refresh the jobs table; user 0 exports once."""
    rng = random.Random(1000 + i)
    it = 0
    while time.monotonic() < ctx["deadline"]:
        try:
            for _ in range(3):  # a slider drag: a few moves, each re-selects from the cached scores
                k = (max(1, round(spec.k_safety * rng.uniform(0.3, 2.0))), max(1, round(spec.k_utility * rng.uniform(0.3, 2.0))))
                start = time.perf_counter()
                out = user.call("select", *k, spec.protect_top, *VIEW)
                stats.request("select", time.perf_counter() - start)
                if amplified_suppressed(out.get("counts", "")) is None:
                    stats.error(f"user {i} select {k}: {str(out.get('counts'))[:200]}")
            if time.monotonic() >= ctx["deadline"]:
                break
            prompt, strength = PROMPTS[(it // 2) % len(PROMPTS)], (1.0 if it % 2 == 0 else 0.0)
            start = time.perf_counter()
            user.call("clear_chat")
            stats.request("other", time.perf_counter() - start)
            out, first, queued, total = user.chat(prompt, strength, ctx["tokens"])
            left, right = answer(out["left"]), answer(out["right"])
            stats.request("chat", total)
            if first is not None:
                stats.request("first_token", first, n=0)
            if queued is not None:
                stats.request("chat_queue", queued, n=0)
                if first is not None:
                    stats.request("first_token_processing", first - queued, n=0)
            if left is None or right is None:
                stats.error(f"user {i} chat: no answer ({str(out.get('chat_status'))[:200]})")
            else:
                want = spec.expected[prompt] if strength == 1.0 else base[prompt]
                stats.check(left == base[prompt], f"user {i} base pane, strength {strength:g}, {prompt!r}: got {left!r}, want {base[prompt]!r}")
                stats.check(right == want, f"user {i} modulated pane, strength {strength:g}, {prompt!r}: got {right!r}, want {want!r}"
                            + "".join(f" (= user {j}'s answer)" for j, e in ctx["expected"].items() if j != i and e[prompt] == right and right != want))
            if i == 0 and not ctx["exported"]:
                ctx["exported"] = True
                start = time.perf_counter()
                out = user.call("export", f"loadtest-{os.getpid()}", False, "", "", timeout=max(user.timeout, 900))
                stats.request("export", time.perf_counter() - start)
                files = out.get("export_files") or []
                if "Exported to" not in out.get("export_status", "") or len(files) != 2 or not all(Path(f).is_file() for f in files):
                    stats.error(f"user {i} export: {str(out.get('export_status'))[:300]}")
            if it % 3 == 2:  # back to its own selection and gains (the reference stays valid)
                start = time.perf_counter()
                user.call("select", spec.k_safety, spec.k_utility, spec.protect_top, *VIEW)
                apply_gains(user, spec)
                stats.request("gains", time.perf_counter() - start, n=2)
            if it % 4 == 3:
                start = time.perf_counter()
                user.call("jobs")
                stats.request("other", time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the user carries on
            stats.error(f"user {i}: {type(exc).__name__}: {exc}")
            time.sleep(1.0)
        it += 1
        time.sleep(rng.uniform(0, 2 * ctx["think"]))


# -- reference answers ----------------------------------------------------------------------------
def references(model: str, cache: Path, scores_path: Path, specs: list[Spec], per_layer_cap, tokens: int) -> tuple[str, dict]:
    """Each user's expected answers, computed here the way the chat does (one batched call, per-row gains)."""
    from neurontune.config import SelectionConfig
    from neurontune.interventions.generation import stream_generate
    from neurontune.method.neuron_scores import NeuronScores
    from neurontune.method.selection import select
    from neurontune.model.loading import load_model

    lm = load_model(model, cache_dir=cache)
    scores = NeuronScores.load(scores_path)
    base: dict[str, str] = {}
    for spec in specs:
        sel = select(scores, SelectionConfig(spec.k_safety, spec.k_utility, per_layer_cap, spec.protect_top))
        c = sel.counts()
        spec.counts = (c["safety"], c["utility"])
        mod = sel.modulation(spec.safety_gain, spec.utility_gain, lm.fingerprint)
        for prompt in PROMPTS:
            conv = [{"role": "user", "content": prompt}]
            texts = ["", ""]
            for texts in stream_generate(lm, [conv, conv], [None, mod], max_new_tokens=tokens):
                pass
            if base.setdefault(prompt, texts[0]) != texts[0]:
                raise RuntimeError("the base answer is not deterministic here: answers cannot be checked")
            spec.expected[prompt] = texts[1]
    return lm.fingerprint, base


def make_specs(n: int, k_safety: int, k_utility: int, protect_top: int) -> list[Spec]:
    """Distinct selections and gains per user (slider steps: safety gain 0.1, over-refusal gain 0.05)."""
    return [Spec(max(1, round(k_safety * (0.5 + (i * 5 % 9) / 8))), max(1, round(k_utility * (0.5 + (i * 3 % 7) / 6))), protect_top,
                 round(1.6 + (i * 7 % 13) * 0.2, 1), (i * 3 % 10) / 10) for i in range(n)]


# -- the run --------------------------------------------------------------------------------------
def run(args, work: Path) -> dict:
    from neurontune.config import load_preset
    from neurontune.model.loading import default_cache_dir

    stats, t_start = Stats(), time.time()
    load = {"start": os.getloadavg()}
    app = App(args.model, args.preset, work, Path(args.shared_cache or default_cache_dir()))
    report: dict = {"model": args.model, "sessions": args.sessions, "minutes": args.minutes, "tokens": args.tokens,
                    "think_s": args.think, "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    try:
        report["app_start_s"] = app.wait_ready()
        report["listening_on"] = sorted(listening_addresses(app.port))
        if report["listening_on"] != ["127.0.0.1"]:
            raise RuntimeError(f"the app listens on {report['listening_on']}, not only on 127.0.0.1")
        downloads = work / "downloads"
        downloads.mkdir()
        trainer = User(app.url, downloads, args.timeout)
        out = trainer.call("on_load", *VIEW)
        fingerprint = re.search(r"fingerprint `([^`]+)`", out["model_status"]).group(1)
        defaults = {k: int(value(out[k])) for k in ("k_safety", "k_utility", "protect_top")}
        meta = {k: value(out[k]) for k in ("mode", "lam_kl", "mu_over_refusal", "max_gain")}
        start = time.perf_counter()
        out = trainer.call("attribute", *VIEW, timeout=3600)
        report["attribution_s"] = time.perf_counter() - start
        print(f"app up in {report['app_start_s']:.1f} s on {app.url}; scores: {out['attr_status'][:70]!r} ({report['attribution_s']:.1f} s)", flush=True)
        scores_path = next((work / "runs" / "attribution").glob("*/scores.safetensors"))

        specs = make_specs(args.sessions, **defaults)
        start = time.perf_counter()
        ref_fp, base = references(args.model, app.cache, scores_path, specs, load_preset(args.preset).selection.per_layer_cap, args.tokens)
        report["reference_s"] = time.perf_counter() - start
        if ref_fp != fingerprint:
            raise RuntimeError(f"reference model {ref_fp} is not the app's {fingerprint}")
        pairs = [(a, b) for a in range(len(specs)) for b in range(a + 1, len(specs))]
        report["distinguishable_pairs"] = {p: sum(specs[a].expected[p] != specs[b].expected[p] for a, b in pairs) for p in PROMPTS}
        report["n_pairs"] = len(pairs)
        report["differs_from_base"] = {p: sum(s.expected[p] != base[p] for s in specs) for p in PROMPTS}
        report["users"] = [{"k_safety": s.k_safety, "k_utility": s.k_utility, "protect_top": s.protect_top, "safety_gain": s.safety_gain,
                            "utility_gain": s.utility_gain, "selected": s.counts, "expected": s.expected} for s in specs]
        report["base_answers"] = base
        print(f"reference answers in {report['reference_s']:.1f} s; distinguishable user pairs per prompt: "
              f"{list(report['distinguishable_pairs'].values())} of {len(pairs)}; modulated != base: {list(report['differs_from_base'].values())} of {len(specs)}", flush=True)

        users = []
        for spec in specs:
            u = User(app.url, downloads, args.timeout)
            setup_user(u, spec)
            users.append(u)

        # the background training: one more session, through the Train button's endpoint
        trainer.call("training_settings", meta["mode"], args.train_steps, meta["lam_kl"], meta["mu_over_refusal"], meta["max_gain"])
        train_job = trainer.client.submit(*VIEW, api_name="/train")
        status = lambda: str(train_job.outputs()[-1][0]) if train_job.outputs() else ""  # noqa: E731
        deadline = time.monotonic() + 600
        while "●" not in status() and not train_job.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        if "●" not in status():
            raise RuntimeError(f"training did not start: {status()!r}")
        print(f"training running: {status().splitlines()[0]!r}; {args.sessions} users for {args.minutes:g} min…", flush=True)

        load["load_start"] = os.getloadavg()
        t0 = time.monotonic()
        ctx = {"deadline": t0 + args.minutes * 60, "tokens": args.tokens, "think": args.think, "exported": False,
               "expected": {i: s.expected for i, s in enumerate(specs)}}
        mark = len(app.rss_samples)
        report["rss_load_start_mib"] = app.rss_samples[-1][1] / 1024 if app.rss_samples else 0
        threads = [threading.Thread(target=simulate, args=(i, u, s, base, ctx, stats), daemon=True) for i, (u, s) in enumerate(zip(users, specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, ctx["deadline"] + args.timeout + 60 - time.monotonic()))
        report["hung_users"] = sum(t.is_alive() for t in threads)
        report["load_seconds"] = time.monotonic() - t0
        window = app.rss_samples[mark:]
        load["during"] = [s[2] for s in window]
        load["end"] = os.getloadavg()
        report["rss_peak_load_mib"] = max((s[1] for s in window), default=0) / 1024
        report["rss_load_end_mib"] = window[-1][1] / 1024 if window else 0
        report["rss_timeline_mib"] = [(round(t - window[0][0]), round(kb / 1024)) for t, kb, _ in window]

        report["training_before_stop"] = status().splitlines()[0] if status() else ""
        trainer.call("stop_train")
        try:
            final = dict(zip(trainer.outputs["train"], train_job.result(timeout=max(args.timeout, 600))))
            report["training_end"] = str(final.get("train_status", "")).splitlines()[0]
        except Exception as exc:  # noqa: BLE001
            stats.error(f"training did not stop: {type(exc).__name__}: {exc}")
        if train_job.done() and "✗" in report.get("training_end", ""):
            stats.error(f"training: {report['training_end']}")
        report["app_hwm_mib"] = app.hwm_kb() / 1024
        report["rss_peak_mib"] = app.rss_peak_kb / 1024
        for line in app.tracebacks():
            stats.error(f"app traceback: {line}")
    finally:
        tail = app.log_tail()
        app.close()
    report["app_log_tail"] = tail.splitlines()[-5:]
    report["wall_s"] = time.time() - t_start
    report["loadavg"] = {"start": load["start"], "load_start": load.get("load_start"), "end": load.get("end"),
                         "during_1min_mean": statistics.mean(load["during"]) if load.get("during") else None,
                         "during_1min_max": max(load["during"]) if load.get("during") else None}
    lat = {k: {"n": len(v), "p50_ms": percentile(v, 50) * 1000, "p95_ms": percentile(v, 95) * 1000, "max_ms": max(v) * 1000}
           for k, v in stats.latency.items() if v}
    report.update(latency=lat, requests=dict(stats.requests), requests_total=sum(stats.requests.values()),
                  errors=len(stats.errors), error_samples=stats.errors[:10], answers_checked=stats.checked,
                  leaks=len(stats.leaks), leak_samples=stats.leaks[:10])
    return report


def print_report(r: dict) -> None:
    lat = r.get("latency", {})

    def p(kind: str, unit: str = "ms") -> str:
        x = lat.get(kind)
        if not x:
            return "—"
        f = (lambda v: f"{v:.0f} ms") if unit == "ms" else (lambda v: f"{v / 1000:.2f} s")
        return f"{f(x['p50_ms'])} / {f(x['p95_ms'])} (n={x['n']}, max {f(x['max_ms'])})"
    la = r["loadavg"]
    fmt = lambda t: " / ".join(f"{v:.2f}" for v in t) if t else "—"  # noqa: E731
    rows = [
        ("users (own gradio_client session each) + trainer session", f"{r['sessions']} + 1"),
        ("load phase", f"{r.get('load_seconds', 0):.0f} s (asked {r['minutes']:g} min), think time 0–{2 * r['think_s']:g} s"),
        ("requests done", f"{r['requests_total']} ({', '.join(f'{k} {v}' for k, v in sorted(r['requests'].items()))})"),
        ("slider → selection, `/select` round trip, p50 / p95", p("select")),
        ("**chat first token** (submit → first non-empty modulated update), p50 / p95", p("first_token")),
        ("… of which waiting in Gradio's queue (chat slots: 4), p50 / p95", p("chat_queue")),
        ("… first token after processing started, p50 / p95", p("first_token_processing")),
        (f"chat, whole answer ({r['tokens']} new tokens max, greedy), p50 / p95", p("chat", "s")),
        ("re-apply own selection + gains (`/select` + `/fixed_gains`), p50 / p95", p("gains")),
        ("export (once, during the load)", p("export", "s")),
        ("**errors** (goal 0)", f"**{r['errors']}**"),
        ("**cross-session leaks** (goal 0)", f"**{r['leaks']}** of {r['answers_checked']} pane answers checked"),
        ("user pairs whose modulated answers differ (per prompt)", ", ".join(f"{v}/{r['n_pairs']}" for v in r.get("distinguishable_pairs", {}).values())),
        ("peak memory, app process tree: VmHWM (whole life) / sampled RSS max", f"{r.get('app_hwm_mib', 0):.0f} / {r.get('rss_peak_mib', 0):.0f} MiB"),
        ("app RSS at load start → max during the load → at its end",
         f"{r.get('rss_load_start_mib', 0):.0f} → {r.get('rss_peak_load_mib', 0):.0f} → {r.get('rss_load_end_mib', 0):.0f} MiB"),
        ("background training", f"{r.get('training_before_stop', '—')} → {r.get('training_end', '—')}"),
        ("load average (1/5/15 min) at start / load start / end", f"{fmt(la['start'])} · {fmt(la['load_start'])} · {fmt(la['end'])}"),
        ("load average (1 min) during the load, mean / max",
         f"{la['during_1min_mean']:.2f} / {la['during_1min_max']:.2f}" if la.get("during_1min_mean") is not None else "—"),
    ]
    print("\n| figure | value |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v} |")
    print(f"\nmodel {r['model']}, {r['cpus']} CPUs, OMP_NUM_THREADS={r['omp_num_threads']}, app start {r.get('app_start_s', 0):.1f} s, "
          f"listening on {r.get('listening_on')}, hung users {r.get('hung_users')}, wall {r['wall_s']:.0f} s")
    for kind in ("error_samples", "leak_samples"):
        for line in r.get(kind, []):
            print(f"  {kind[:-8]}: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded (default) or tiny-llama for a quick check")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--sessions", type=int, default=8, help=f"simulated users (at most {MAX_SESSIONS})")
    ap.add_argument("--minutes", type=float, default=3.0, help=f"length of the load phase (at most {MAX_MINUTES})")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per chat answer (greedy)")
    ap.add_argument("--think", type=float, default=0.5, help="mean pause between a user's actions, seconds")
    ap.add_argument("--train-steps", type=int, default=200, help="steps of the background training (stopped at the end)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take before it counts as an error")
    ap.add_argument("--shared-cache", default=None, help="cache to reuse the model and scores from (default ~/.cache/neurontune)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (app log, runs, export)")
    args = ap.parse_args()
    args.sessions = max(1, min(args.sessions, MAX_SESSIONS))
    args.minutes = max(0.1, min(args.minutes, MAX_MINUTES))
    args.train_steps = max(1, min(args.train_steps, 200))  # the Tune tab's steps slider goes to 200

    work = Path(f"/tmp/loadtest_{os.getpid()}_{int(time.time())}")
    work.mkdir()
    print(f"# load_test: model={args.model}, {args.sessions} users, {args.minutes:g} min, work folder {work}", flush=True)
    try:
        report = run(args, work)
    except BaseException:
        log = work / "app.log"
        if log.exists():
            print("--- app log (last 40 lines) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    sys.exit(1 if report["errors"] or report["leaks"] else 0)


if __name__ == "__main__":
    main()
