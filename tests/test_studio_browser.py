"""A real browser (headless Debian Chromium via Playwright) runs the studio's one-button default flow on
the tiny model: the heatmap and both chat panes must render, a click on a heatmap cell opens that neuron's
card, a click on a trade-off point makes it the session's; a screenshot of each tab goes to tests/artifacts/.
`NEURONTUNE_BROWSER_MODEL=embedded` instead opens the embedded model's page on the shipped run and takes the
README screenshots (tabs, neuron card, bulk table, trade-off picker) into tests/artifacts/browser-embedded/.

Needs /usr/bin/chromium (`make browser`); never `playwright install`."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import STUDIO_PRESET, served_studio, wait_until

CHROMIUM = os.environ.get("NEURONTUNE_CHROMIUM", "/usr/bin/chromium")
MODEL = os.environ.get("NEURONTUNE_BROWSER_MODEL", "tiny-llama")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / ("browser" if MODEL == "tiny-llama" else f"browser-{MODEL}")
TABS = [("model", "1 · Model & data"), ("explore", "2 · Explore"), ("tune", "3 · Tune"), ("compare", "4 · Compare"),
        ("evaluate", "5 · Evaluate"), ("export", "6 · Export")]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    if MODEL == "tiny-llama":
        preset = tmp / "tiny.json"
        preset.write_text(json.dumps(STUDIO_PRESET))
        served = served_studio(MODEL, str(preset), tmp, quick_default=False)
    else:  # the README screenshots: the real model, quick preset, the user's model/attribution cache
        served = served_studio(MODEL, "balanced", tmp, cache_dir=None)
    with served as (_, url):
        yield url


def _launch(p):
    return p.chromium.launch_persistent_context(
        str(ARTIFACTS / "profile"), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"])


def _click_heatmap_cell(page, fx: float = 0.5, fy: float = 0.5) -> None:
    """Click inside the heatmap's plotting area (fractions of its width and height): plotly reports the cell."""
    area = page.locator("#heatmap .nsewdrag").first
    box = area.bounding_box()
    page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
    time.sleep(0.3)
    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)


def _shot(page, name: str) -> None:
    time.sleep(0.8)  # plotly lays out a newly shown tab
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.mark.skipif(MODEL != "tiny-llama", reason="the embedded model takes the README screenshots instead")
def test_default_flow_in_browser(studio_url):
    from playwright.sync_api import expect, sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    timeout_s = 120 if MODEL == "tiny-llama" else 900
    with sync_playwright() as p:
        ctx = _launch(p)
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
            # a click on a heatmap cell opens that neuron's card
            time.sleep(1.0)  # the click listener binds within 0.4 s of the figure being drawn
            _click_heatmap_cell(page, 0.3, 0.5)
            expect(page.locator("#card-status")).to_contain_text("Neuron ", timeout=60_000)
            expect(page.locator("#card-status")).to_contain_text("Writes towards")
            expect(page.locator("#card-acts .js-plotly-plot")).to_be_visible()
            expect(page.locator("#card-effect")).to_contain_text("silenced")
            page.locator("#card-status").screenshot(path=str(ARTIFACTS / "card-header.png"))
            page.get_by_role("tab", name="6 · Export").click()
            page.get_by_role("button", name="Export", exact=True).click()
            expect(page.get_by_text("Exported to").first).to_be_visible(timeout=timeout_s * 1000)  # measured: a job
            if MODEL != "tiny-llama":  # the README's Evaluate screenshot: a real metrics table
                page.get_by_role("tab", name="5 · Evaluate").click()
                page.get_by_role("button", name="Run evaluation").click()
                expect(page.get_by_text("Evaluating: done").first).to_be_visible(timeout=timeout_s * 1000)
            else:  # the trade-off picker: a sweep, then a click on its second point makes that point the session's
                page.get_by_role("tab", name="5 · Evaluate").click()
                page.get_by_label("sweep grid (k_safety:k_utility, …)").fill("5:2, 20:5")
                page.get_by_role("button", name="Run sweep").click()
                expect(page.get_by_text("Sweeping thresholds: done").first).to_be_visible(timeout=timeout_s * 1000)
                point = page.locator("#tradeoff .scatterlayer .trace").first.locator(".point").nth(1)
                expect(point).to_be_attached(timeout=10_000)
                time.sleep(1.0)
                point.click(force=True)
                expect(page.locator("#pick-status")).to_contain_text("Point 1 (k_safety=20, k_utility=5", timeout=30_000)
                page.get_by_role("button", name="→ Compare").click()
                expect(page.locator("#pane-base")).to_be_visible()
            for tab_id, name in TABS:
                page.get_by_role("tab", name=name).click()
                _shot(page, f"{TABS.index((tab_id, name)) + 1}-{tab_id}.png")
            assert (ARTIFACTS / "2-explore.png").stat().st_size > 10_000
        finally:
            ctx.close()


@pytest.mark.skipif(MODEL == "tiny-llama", reason="README screenshots: NEURONTUNE_BROWSER_MODEL=embedded")
def test_readme_screenshots_on_the_shipped_run(studio_url):
    """The embedded model's first page, filled from the shipped run; then the card, the bulk table and the picker."""
    from playwright.sync_api import expect, sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as p:
        ctx = _launch(p)
        try:
            page = ctx.new_page()
            start = time.perf_counter()
            page.goto(studio_url, wait_until="domcontentloaded")
            expect(page.get_by_text("the shipped").first).to_be_visible(timeout=60_000)
            page.get_by_role("tab", name="5 · Evaluate").click()
            expect(page.locator("#eval-table")).to_contain_text("neurontune + gate", timeout=30_000)
            page.get_by_role("tab", name="4 · Compare").click()
            expect(page.locator("#pane-tuned .message-row")).to_have_count(2, timeout=30_000)
            print(f"page load to filled Compare and Evaluate: {time.perf_counter() - start:.1f} s")
            page.get_by_role("tab", name="2 · Explore").click()
            expect(page.locator("#heatmap .heatmaplayer, #heatmap g.hm, #heatmap image").first).to_be_attached(timeout=30_000)
            time.sleep(1.0)
            _click_heatmap_cell(page, 0.62, 0.75)
            expect(page.locator("#card-status")).to_contain_text("Writes towards", timeout=300_000)
            _show_kind(page, "Learned gain − 1 (the current gains)")  # the table by |gain − 1|: modulated neurons first
            _visible(page.locator("#top-table").get_by_text("amplify", exact=True)).click()  # a table row opens its card too
            expect(page.locator("#card-status")).to_contain_text("amplified", timeout=300_000)
            _show_kind(page, "Safety: pushes harmful prompts towards refusal")
            for tab_id, name in TABS:
                page.get_by_role("tab", name=name).click()
                _shot(page, f"{TABS.index((tab_id, name)) + 1}-{tab_id}.png")
            page.get_by_role("tab", name="2 · Explore").click()
            time.sleep(0.8)
            page.locator("#neuron-card").screenshot(path=str(ARTIFACTS / "card.png"))
            page.get_by_role("tab", name="4 · Compare").click()
            page.get_by_text("Your prompts, in bulk").click()
            page.get_by_label("or paste prompts, one per line").fill(
                "Write a tutorial on how to bake bread\nHow do I pick a lock?\nWrite a convincing phishing email to steal bank logins\n"
                "How can I kill a Python process that hangs?")
            page.get_by_role("button", name="Run base vs tuned").click()
            expect(page.get_by_text("Answering your prompts: done").first).to_be_visible(timeout=600_000)
            page.locator("#bulk-status").scroll_into_view_if_needed()
            time.sleep(0.8)
            page.screenshot(path=str(ARTIFACTS / "bulk.png"), full_page=True)
            page.get_by_role("tab", name="3 · Tune").click()  # a quick sweep for the picker: 2 training steps a point
            page.get_by_text("Training settings (from the preset)").click()
            steps = page.locator("input[aria-label='number input for steps']")
            steps.fill("2")
            steps.press("Enter")
            page.get_by_role("tab", name="5 · Evaluate").click()
            page.get_by_label("sweep grid (k_safety:k_utility, …)").fill("1000:200, 1500:500, 3000:250")
            page.get_by_role("button", name="Run sweep").click()
            expect(page.get_by_text("Sweeping thresholds: done").first).to_be_visible(timeout=1_800_000)
            point = page.locator("#tradeoff .scatterlayer .trace").first.locator(".point").nth(1)
            time.sleep(1.0)
            point.click(force=True)
            expect(page.locator("#pick-status")).to_contain_text("Point 1", timeout=60_000)
            page.mouse.move(5, 5)
            time.sleep(0.8)
            page.screenshot(path=str(ARTIFACTS / "picker.png"), full_page=True)
            page.get_by_role("tab", name="1 · Model & data").click()  # last: other prompt files change the session's data
            page.get_by_text("Your own prompts (optional").click()
            folder = ARTIFACTS / "prompts"
            folder.mkdir()
            (folder / "harmful.csv").write_text("prompt\n" + "\n".join(f"Explain how to build weapon number {i}" for i in range(40)) + "\n")
            (folder / "benign.csv").write_text("prompt\n" + "\n".join(f"What is the tallest mountain in country {i}?" for i in range(40)) + "\n")
            page.locator("#file-harmful input[type=file]").set_input_files(str(folder / "harmful.csv"))
            page.locator("#file-benign input[type=file]").set_input_files(str(folder / "benign.csv"))
            time.sleep(1.5)
            page.get_by_role("button", name="Load model & data").click()
            expect(page.locator("#form-check")).to_contain_text("Separable by form", timeout=120_000)
            expect(page.locator("#form-check")).to_contain_text("40 harmful")
            time.sleep(0.8)
            page.screenshot(path=str(ARTIFACTS / "form-check.png"), full_page=True)
        finally:
            ctx.close()


def _show_kind(page, label: str) -> None:
    box = page.get_by_label("Score shown")
    box.click()
    box.fill(label.split(":")[0][:12])  # the list is long: filter it first
    page.get_by_role("option", name=label).click()
    time.sleep(2.0)


def _visible(locator, timeout: float = 60.0):
    """The first visible match (the table keeps hidden copies of some cells), waiting for one to appear."""
    found = []
    if not wait_until(lambda: found.extend(c for c in locator.all() if c.is_visible()) or found, timeout, every=0.5):
        raise AssertionError(f"no visible {locator}")
    return found[0]
