"""A real browser (headless Debian Chromium via Playwright) runs the studio's one-button default flow on
the tiny model: the heatmap and both chat panes must render; a screenshot of each tab goes to
tests/artifacts/. `NEURONTUNE_BROWSER_MODEL=embedded` runs it on the embedded model instead (README shots).

Needs /usr/bin/chromium (`make browser`); never `playwright install`."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import served_studio

CHROMIUM = os.environ.get("NEURONTUNE_CHROMIUM", "/usr/bin/chromium")
MODEL = os.environ.get("NEURONTUNE_BROWSER_MODEL", "tiny-llama")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / ("browser" if MODEL == "tiny-llama" else f"browser-{MODEL}")
TABS = [("model", "1 · Model & data"), ("explore", "2 · Explore"), ("tune", "3 · Tune"), ("compare", "4 · Compare"),
        ("evaluate", "5 · Evaluate"), ("export", "6 · Export")]
TINY_PRESET = {"name": "tiny-test",
               "data": {"n_harmful": 4, "n_attack_per_family": 1, "n_benign": 4, "n_borderline": 2, "n_answer": 4, "answer_tokens": 8},
               "attribution": {"max_length": 64, "batch_size": 16},
               "selection": {"k_safety": 40, "k_utility": 20, "protect_top": 10},
               "meta": {"steps": 3, "eval_every": 1, "batch_harmful": 2, "batch_benign": 2}}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    if MODEL == "tiny-llama":
        preset = tmp / "tiny.json"
        preset.write_text(json.dumps(TINY_PRESET))
        served = served_studio(MODEL, str(preset), tmp, quick_default=False)
    else:  # the README screenshots: the real model, quick preset, the user's model/attribution cache
        served = served_studio(MODEL, "balanced", tmp, cache_dir=None)
    with served as (_, url):
        yield url


def test_default_flow_in_browser(studio_url):
    from playwright.sync_api import expect, sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    timeout_s = 120 if MODEL == "tiny-llama" else 900
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(ARTIFACTS / "profile"), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = ctx.new_page()
            page.goto(studio_url, wait_until="domcontentloaded")
            flow = page.locator("#run-flow")
            expect(flow).to_be_visible(timeout=30_000)
            expect(page.get_by_text("layers ×").first).to_be_visible(timeout=30_000)  # on-load model status
            flow.click()
            # the flow walks Explore -> Tune -> Compare and ends with "Done" in its status line
            expect(page.locator("#chat-status")).to_contain_text("Strength", timeout=timeout_s * 1000)
            expect(page.locator("#pane-base .message-row")).to_have_count(2, timeout=10_000)
            expect(page.locator("#pane-tuned .message-row")).to_have_count(2)
            for pane in ("#pane-base", "#pane-tuned"):
                expect(page.locator(f"{pane} .message-row").last).to_contain_text("judge")
            page.screenshot(path=str(ARTIFACTS / "compare.png"))

            page.get_by_role("tab", name="2 · Explore").click()
            heat = page.locator("#heatmap .js-plotly-plot")
            expect(heat).to_be_visible(timeout=10_000)
            expect(page.locator("#heatmap .heatmaplayer, #heatmap g.hm, #heatmap image").first).to_be_attached()
            expect(page.locator("#heatmap .scatterlayer .point").first).to_be_attached()  # the selection overlay
            page.get_by_role("tab", name="6 · Export").click()
            page.get_by_role("button", name="Export", exact=True).click()
            expect(page.get_by_text("Exported to").first).to_be_visible(timeout=60_000)
            if MODEL != "tiny-llama":  # the README's Evaluate screenshot: a real metrics table
                page.get_by_role("tab", name="5 · Evaluate").click()
                page.get_by_role("button", name="Run evaluation").click()
                expect(page.get_by_text("Evaluating: done").first).to_be_visible(timeout=timeout_s * 1000)
            for tab_id, name in TABS:
                page.get_by_role("tab", name=name).click()
                time.sleep(0.8)  # plotly lays out a newly shown tab
                page.screenshot(path=str(ARTIFACTS / f"{TABS.index((tab_id, name)) + 1}-{tab_id}.png"), full_page=True)
            assert (ARTIFACTS / "2-explore.png").stat().st_size > 10_000
        finally:
            ctx.close()
