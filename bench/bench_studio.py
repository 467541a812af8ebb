"""Studio benchmark on the embedded model: slider change -> updated selection (engine call, the full view
update, and a gradio_client round trip), side-by-side chat cost as a ratio to one single-model
generation (goal <= 1.3x; sequential would be 2x), and app cold start to the first page.

    python bench/bench_studio.py [--model embedded] [--repeats 5] [--tokens 48] [--skip-cold-start]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOALS = {"side-by-side / single generation": 1.3}
CHAT_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_slider(studio, session, repeats: int) -> dict:
    """Selection from cached scores (engine), and the whole update a slider move sends (figures, table)."""
    from neurontune.studio import handlers
    from neurontune.studio.views import View

    ks = [(500, 100), (1500, 500), (3000, 1000), (800, 300)]
    i = iter(range(10**6))

    def engine():
        k = ks[next(i) % len(ks)]
        session.reselect(*k, 500)

    def full():
        k = ks[next(i) % len(ks)]
        handlers.on_select(studio, session, *k, 500, View("safety", 15, 50))
    return {"select() from cached scores": median_ms(engine, repeats * 4), "full view update (figures + table)": median_ms(full, repeats)}


def bench_slider_client(url: str, preset: str, repeats: int) -> float:
    from gradio_client import Client

    c = Client(url, verbose=False)
    c.predict("embedded", False, preset, True, None, None, None, "safety", 0, 50, api_name="/load_model")
    c.predict("safety", 0, 50, api_name="/attribute")
    ks = iter([(500, 100), (1500, 500), (3000, 1000), (800, 300)] * 100)
    return median_ms(lambda: c.predict(*next(ks), 500, "safety", 15, 50, api_name="/select"), repeats)


def bench_chat(lm, mod, tokens: int, repeats: int) -> dict:
    """One row (base) vs the side-by-side call (base + modulated rows in one batch) vs two calls in a row."""
    from neurontune.interventions.generation import stream_generate

    conv = [{"role": "user", "content": CHAT_PROMPT}]
    lengths = {}

    def run(rows, gains, key):
        first = None
        start = time.perf_counter()
        for texts in stream_generate(lm, [conv] * rows, gains, max_new_tokens=tokens):
            if first is None:
                first = time.perf_counter() - start
        lengths[key] = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return first

    single = median_ms(lambda: run(1, [None], "single"), repeats)
    pair = median_ms(lambda: run(2, [None, mod], "pair"), repeats)
    sequential = median_ms(lambda: (run(1, [None], "seq"), run(1, [mod], "seq")), repeats)
    first_ms = statistics.median(run(2, [None, mod], "pair") * 1000 for _ in range(repeats))
    return {"single": single, "pair": pair, "sequential": sequential, "first_token_ms": first_ms, "lengths": lengths}


def bench_cold_start(model: str, timeout: float = 300) -> float:
    """Seconds from `python app.py` to the first page served (model loaded before serving)."""
    port = free_port()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(port),
                                 "--runs-dir", f"{tmp}/runs", "--export-root", f"{tmp}/exports"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - start < timeout:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200 and b"gradio" in r.read().lower():
                            return time.perf_counter() - start
                except OSError:
                    time.sleep(0.2)
            raise TimeoutError("the app did not serve its first page in time")
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--skip-cold-start", action="store_true")
    args = p.parse_args()
    import torch

    from neurontune.studio import Studio, background, launch

    print(f"# bench_studio: model={args.model}, torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    cold = None if args.skip_cold_start else bench_cold_start(args.model)  # first, before this process warms caches
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(args.model, args.preset, runs_dir=f"{tmp}/runs", export_root=f"{tmp}/exports")
        session = studio.new_session()
        lm = studio.model(session)
        start = time.perf_counter()
        for update in background.attribute(studio, session):  # quick preset; cached after the first run
            pass
        print(f"attribution (quick preset): {time.perf_counter() - start:.1f} s ({update.get('attr_status', '')[:60]})")
        slider = bench_slider(studio, session, args.repeats)
        port = free_port()
        demo, _ = launch(studio, port=port, prevent_thread_lock=True, quiet=True)
        try:
            slider["gradio_client round trip (/select)"] = bench_slider_client(f"http://127.0.0.1:{port}/", args.preset, args.repeats)
        finally:
            demo.close()
        mod = session.selection.modulation(2.0, 0.5, lm.fingerprint)
        chat = bench_chat(lm, mod, args.tokens, args.repeats)

    print("\n| measurement | value |\n|---|---|")
    for name, ms in slider.items():
        print(f"| slider -> selection: {name} | {ms:.1f} ms |")
    ratio = chat["pair"] / chat["single"]
    print(f"| chat, one model ({args.tokens} new tokens max, greedy) | {chat['single'] / 1000:.2f} s |")
    print(f"| chat, side by side in one batched call | {chat['pair'] / 1000:.2f} s |")
    print(f"| chat, the two models one after the other | {chat['sequential'] / 1000:.2f} s |")
    print(f"| **side-by-side / single generation** (goal <= {GOALS['side-by-side / single generation']}) | **{ratio:.2f}x** "
          f"(sequential: {chat['sequential'] / chat['single']:.2f}x) |")
    print(f"| side-by-side first token | {chat['first_token_ms']:.0f} ms |")
    if cold is not None:
        print(f"| app cold start to first page ({args.model}) | {cold:.1f} s |")
    print(f"\ntokens generated per row: {chat['lengths']}")


if __name__ == "__main__":
    main()
