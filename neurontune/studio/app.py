"""The studio's page: six tabs (Model & data, Explore, Tune, Compare, Evaluate, Export), each built by one small
function that lays out its components and wires them to the callbacks in handlers / background / chat / card /
picker / bulk. `build_app(studio)` returns the Blocks; `launch(...)` serves it. Every callback declares the outputs
it returns (`views.returns`): the page binds those, and `OUTPUTS` (what a `gradio_client` call returns) is read
from them."""
from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr
from gradio.utils import get_upload_folder

from ..method.selection import RULES
from . import background, bulk, card, chat, handlers, judging, picker, plots, shipped
from .state import BUILTIN_MODELS, Session, Studio
from .views import KIND_LABELS, View, returns

HOW = {  # the "how to read this" line of each tab
    "model": "Pick a model and a preset, then **Run the whole flow**: it scores every MLP neuron, selects the safety and "
             "over-refusal neurons, trains their gains and asks both models a held-out jailbreak. Each step also has its own tab.",
    "explore": "Each cell is a bin of neurons in one layer, coloured by its most extreme score: red pushes towards refusal, blue away. "
               "▲ marks bins with neurons to amplify, ▼ bins with neurons to suppress. Hover for numbers; sort the table by any column. "
               "**Click a cell, a drill-down point or a table row for that neuron's card.**",
    "tune": "Sliders re-select instantly from the cached scores. **Train gains** meta-learns one gain per selected neuron "
            "(amplify safety ≥ 1, suppress over-refusal ≤ 1); the validation loss is what early stopping watches.",
    "compare": "Left: the base model. Right: the same model with your gains. Both answer in one batched call with the same decoding; "
               "the line under each answer is the refusal judge's verdict. Strength 0 makes the right pane the base model. "
               "Trained gains come with an **input gate**: it reads your last message alone (an earlier harmful turn does not hold it "
               "open) and measures s (0 = looks benign, 1 = looks harmful); the right pane applies strength × s, what the evaluation "
               "calls “neurontune + gate”; untick it for what Export folds (a gate cannot be folded into weights).",
    "evaluate": "Held-out harmful prompts and unseen attack families (refusal ↑ is better), benign and borderline prompts "
                "(over-refusal ↓), perplexity ratio ≈ 1 and multiple choice accuracy (utility kept). The sweep trains gains at each "
                "(k_safety, k_utility) and keeps them: **click a point** (or a table row) to make it the session's, then Compare or Export it.",
    "export": "Folds the run's modulation into the model's own weights (for the presets: a switch of two rewritten neurons that "
              "reads the prompt, and input-side terms of later neurons that turn its flag into a refusal; same architecture and "
              "config): a standard checkpoint any `transformers` code loads, plus the small modulation file and a model card. "
              "A Hub token is used for the push only and never stored. An input gate cannot be folded: the checkpoint holds "
              "what Compare shows with *input gate* unticked.",
}
CSS = """
#run-flow {font-size: 1.15rem; min-height: 3.2rem}
.how {color: var(--body-text-color-subdued); font-size: 0.92rem}
.pane-title {text-align: center; font-weight: 600; margin-bottom: -0.4rem}
#card-status h3 {margin-top: 0.2rem}
"""
# Plotly clicks -> the page's own inputs: a heatmap cell or drill-down point fills the card's layer and index and
# presses "Show card"; a trade-off point fills the point number and presses "Use this point". Re-bound whenever
# a figure is redrawn (polled: Gradio replaces figures in place).
CLICKS_JS = """
() => {
  const setNumber = (id, value) => {
    const input = document.querySelector(`#${id} input`);
    if (!input) return;
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, value);
    input.dispatchEvent(new Event('input', {bubbles: true}));
  };
  const press = (id, scrollTo) => setTimeout(() => {
    document.getElementById(id)?.click();
    if (scrollTo) document.getElementById(scrollTo)?.scrollIntoView({behavior: 'smooth', block: 'start'});
  }, 150);
  const card = (layer, neuron) => { setNumber('card-layer', Math.round(layer)); setNumber('card-index', Math.round(neuron)); press('card-btn', 'card-status'); };
  const handlers = {
    'heatmap': (p) => { const c = p.customdata; if (c == null) return; card(p.y, p.data.type === 'heatmap' ? c[0] : c[1]); },
    'drill': (p) => { const c = p.customdata; if (c == null) return; card(c[1], p.x); },
    'tradeoff': (p) => { if (p.curveNumber !== 0 || p.customdata == null) return; setNumber('point-index', p.customdata); press('pick-btn'); },
  };
  const bind = () => {
    for (const [id, fn] of Object.entries(handlers)) {
      const div = document.querySelector(`#${id} .js-plotly-plot`);
      if (!div || typeof div.on !== 'function' || div._ntLayout === div._fullLayout) continue;
      div._ntLayout = div._fullLayout;
      if (div.removeAllListeners) div.removeAllListeners('plotly_click');
      div.on('plotly_click', (ev) => { if (ev && ev.points && ev.points.length) fn(ev.points[0]); });
    }
  };
  setInterval(bind, 400);
}
"""


def gpu_decorator() -> Callable:
    """`spaces.GPU` on a Hugging Face Space that has it; a no-op everywhere else (no dependency)."""
    try:
        import spaces  # type: ignore[import-not-found]
        return spaces.GPU
    except ImportError:
        return lambda fn: fn


@returns(*handlers.LOAD, "recent_runs", "export_name", "chat_status", "jobs_table", "eval_table", "eval_samples", "eval_status",
         "flow_status", "tradeoff", "points")
def on_load(studio: Studio, session: Session, view: View = View()) -> dict:
    """A new page draws its session: the shipped run when the session opened on it (heatmap, gains, evaluation at
    once), else the shared default model and any neuron scores already computed for it (reused)."""
    out = shipped.open_shipped(studio, session, view)
    if not out:
        out = handlers.load(studio, session, session.model or studio.default_model, False, session.preset or studio.default_preset,
                            studio.quick_default, None, None, None, view)
    return {"chat_status": handlers.gains_text(session), **out, **handlers.recent_runs(studio, session), **handlers.jobs_table(studio),
            "export_name": handlers.suggest_name(session), **picker.sweep_views(session)}


ENDPOINTS = {  # api name -> callback; each callback's `outputs` are what the call returns, in order
    "load_model": handlers.load, "default_flow": background.flow, "jobs": handlers.jobs_table, "on_load": on_load,
    "attribute": background.attribute, "view": handlers.view, "card": card.card_views,
    "select": handlers.on_select, "training_settings": handlers.on_meta, "train": background.train,
    "fixed_gains": handlers.fixed_gains, "gains_file": handlers.gains_file, "refresh_runs": handlers.recent_runs,
    "use_run": handlers.use_run, "chat": chat.chat, "clear_chat": chat.clear, "bulk": bulk.run_bulk, "filter_bulk": bulk.filter_bulk,
    "evaluate": background.evaluate, "sweep": background.sweep, "pick_point": picker.pick_point, "export": background.export,
    **{f"stop_{kind}": background.stopper(kind) for kind in ("attribution", "train", "evaluate", "bulk")},
}
OUTPUTS = {api: list(fn.outputs) for api, fn in ENDPOINTS.items()}  # api name -> output names, in order (gradio_client)


class Page:
    """The page under construction: its components by name (`C`), the session state, and `bind`, which turns a
    callback into the keyword arguments of a gradio event."""

    def __init__(self, studio: Studio):
        self.studio, self.C = studio, {}
        self.first = studio.new_session()  # the initial values the components show
        self.gpu = gpu_decorator()
        self.session: gr.State | None = None

    @property
    def view_in(self) -> list:
        """The three inputs of a `View`: score kind, drill-down layer, table rows (last in a view callback's inputs)."""
        return [self.C["kind"], self.C["drill_layer"], self.C["top"]]

    def bind(self, fn: Callable, api: str | None, *, view: bool = False, gpu: bool = False, **kwargs) -> dict:
        """`fn(studio, session, *args[, view=View])` returning or yielding {name: value} -> gradio's event kwargs
        (its declared outputs as components). `api`: the endpoint name, or None for a page-only event."""
        names, studio, C = fn.outputs, self.studio, self.C

        def call(args):
            if view:
                *args, kind, layer, top = args
                return fn(studio, *args, view=View.of(kind, layer, top))
            return fn(studio, *args)

        def named(update: dict) -> dict:
            if undeclared := set(update) - set(names):
                raise KeyError(f"{fn.__name__} returned {sorted(undeclared)}, which its @returns does not declare.")
            return {C[k]: v for k, v in update.items()}
        if inspect.isgeneratorfunction(fn):
            def run(*args):
                for update in call(args):
                    yield named(update)
        else:
            def run(*args):
                update = named(call(args))
                return update if names else None  # an event without outputs returns nothing
        run.__name__ = api or fn.__name__
        return dict(fn=self.gpu(run) if gpu else run, outputs=[C[n] for n in names],
                    **({"api_name": api} if api else {"api_name": None, "api_visibility": "private"}), **kwargs)


QUIET = dict(show_progress="hidden")
JOBS = dict(concurrency_limit=None, show_progress="hidden")  # watchers only poll; the runner queues the work
FAST = dict(concurrency_id="fast", concurrency_limit=8, trigger_mode="always_last", **QUIET)


def model_tab(page: Page) -> Callable[[], None]:
    C, studio = page.C, page.studio
    with gr.Tab("1 · Model & data", id="model"):
        gr.Markdown(HOW["model"], elem_classes="how")
        with gr.Row():
            with gr.Column(scale=2):
                C["model_name"] = gr.Dropdown(list(dict.fromkeys([studio.default_model, *BUILTIN_MODELS])), value=studio.default_model,
                                              allow_custom_value=True, label="Model", info="embedded (SmolLM2-135M-Instruct), a Hub id, a local folder or .gguf")
                C["trust"] = gr.Checkbox(False, label="trust_remote_code", info="Runs the model repository's own Python code: only for repositories you trust.")
                C["preset"] = gr.Dropdown(studio.presets(), value=studio.default_preset, allow_custom_value=True,
                                          label="Preset", info="or a path to a preset .json")
                C["quick"] = gr.Checkbox(studio.quick_default, label="Quick first look", info="fewer prompts and ≤ 20 training steps")
                with gr.Accordion("Your own prompts (optional: csv / json / jsonl / parquet with a 'prompt' column)", open=False):
                    with gr.Row():
                        files = [gr.File(label=l, file_types=[".csv", ".json", ".jsonl", ".parquet"], type="filepath", height=90,
                                         elem_id=f"file-{l.split('-')[0]}") for l in ("harmful", "benign", "borderline-safe")]
                load_btn = gr.Button("Load model & data")
                C["form_check"] = gr.Markdown("", elem_id="form-check")
            with gr.Column(scale=3):
                flow_btn = gr.Button("▶ Run the whole flow", variant="primary", elem_id="run-flow")
                C["flow_status"] = gr.Markdown("One click: score → select → train → compare, on the defaults.", elem_id="flow-status")
                C["model_status"] = gr.Markdown("")
                with gr.Accordion("Background jobs (all sessions; kept across restarts)", open=False):
                    C["jobs_table"] = gr.Dataframe(interactive=False, max_height=260, wrap=True)
                    jobs_btn = gr.Button("Refresh", size="sm")

    def wire():
        load_in = [page.session, C["model_name"], C["trust"], C["preset"], C["quick"], *files, *page.view_in]
        load_btn.click(**page.bind(handlers.load, "load_model", view=True, concurrency_id="load", concurrency_limit=1), inputs=load_in)
        flow_btn.click(**page.bind(background.flow, "default_flow", view=True, **JOBS), inputs=load_in)
        jobs_btn.click(**page.bind(handlers.jobs_table, "jobs", **QUIET), inputs=[page.session])
    return wire


def explore_tab(page: Page) -> Callable[[], None]:
    C = page.C
    with gr.Tab("2 · Explore", id="explore"):
        gr.Markdown(HOW["explore"], elem_classes="how")
        with gr.Row():
            attr_btn = gr.Button("Score neurons (attribution)", variant="primary", scale=2)
            attr_stop = gr.Button("Stop", variant="stop", scale=1)
            C["kind"] = gr.Dropdown([(KIND_LABELS["safety"], "safety")], value="safety", label="Score shown", scale=4)
        C["attr_status"] = gr.Markdown("")
        C["heatmap"] = gr.Plot(plots.empty("No neuron scores yet.", 460), label="Attribution: layers × neuron bins", elem_id="heatmap")
        with gr.Accordion("Neuron card: click a heatmap cell, a drill-down point or a table row", open=True, elem_id="neuron-card"):
            with gr.Row():
                C["card_layer"] = gr.Number(None, label="layer", precision=0, minimum=0, elem_id="card-layer", scale=1)
                C["card_index"] = gr.Number(None, label="neuron", precision=0, minimum=0, elem_id="card-index", scale=1)
                card_btn = gr.Button("Show card", elem_id="card-btn", scale=1)
            C["card_status"] = gr.Markdown("", elem_id="card-status")
            with gr.Row():
                C["card_acts"] = gr.Plot(plots.empty("", 300), label="Activation on the run's prompts", elem_id="card-acts")
                with gr.Column():
                    C["card_effect"] = gr.Dataframe(label="First-token refusal probability with this neuron alone at gain 0, 1 and "
                                                    "its tuned gain (held-out prompts)", interactive=False, wrap=True, elem_id="card-effect")
                    C["card_scores"] = gr.Dataframe(label="Every score and its rank among all neurons (1 = highest)",
                                                    interactive=False, max_height=260, elem_id="card-scores")
            C["card_prompts"] = gr.Dataframe(label="Prompts that make it fire most and least (red: harmful, blue: harmless)",
                                             interactive=False, wrap=True, max_height=360, elem_id="card-prompts")
        with gr.Row():
            with gr.Column():
                C["drill_layer"] = gr.Slider(0, 29, 0, step=1, label="Drill down into layer")
                C["drill"] = gr.Plot(plots.empty("", 300), label="One layer", elem_id="drill")
            C["dist_explore"] = gr.Plot(plots.empty("", 300), label="Selection per layer")
        with gr.Row():
            C["top"] = gr.Number(50, label="Rows in the table", precision=0, minimum=5, maximum=2000, scale=1)
            gr.Markdown("Top neurons by the score shown: layer, index, every score, mean activation on harmful vs benign "
                        "prompts, role and current gain. Click a header to sort.", elem_classes="how")
        C["table"] = gr.Dataframe(label="Top neurons (click a row for its card)", interactive=False, max_height=420, elem_id="top-table")

    def wire():
        session, studio = page.session, page.studio
        attr_btn.click(**page.bind(background.attribute, "attribute", view=True, **JOBS), inputs=[session, *page.view_in])
        attr_stop.click(**page.bind(ENDPOINTS["stop_attribution"], "stop_attribution", **QUIET), inputs=[session])
        C["kind"].input(**page.bind(handlers.view, "view", view=True, **FAST), inputs=[session, *page.view_in])
        C["drill_layer"].release(**page.bind(handlers.view, None, view=True, **FAST), inputs=[session, *page.view_in])
        C["top"].input(**page.bind(handlers.view, None, view=True, **FAST), inputs=[session, *page.view_in])
        card_kw = page.bind(card.card_views, "card", concurrency_id="card", concurrency_limit=2, show_progress="minimal")
        card_btn.click(**card_kw, inputs=[session, C["card_layer"], C["card_index"]])

        def table_card(se, evt: gr.SelectData):
            return {C[k]: v for k, v in card.card_from_row(studio, se, evt.row_value).items()}
        C["table"].select(table_card, inputs=[session], outputs=card_kw["outputs"], concurrency_id="card", show_progress="minimal",
                          api_visibility="private").then(
            fn=None, js="() => document.getElementById('card-status')?.scrollIntoView({behavior: 'smooth', block: 'start'})")
    return wire


def tune_tab(page: Page) -> Callable[[], None]:
    C, s, m = page.C, page.first.cfg.selection, page.first.cfg.meta
    with gr.Tab("3 · Tune", id="tune"):
        gr.Markdown(HOW["tune"], elem_classes="how")
        with gr.Row():
            with gr.Column(scale=2):
                C["k_safety"] = gr.Slider(0, 20_000, s.k_safety, step=1, label="k_safety: neurons to amplify")
                C["k_utility"] = gr.Slider(0, 20_000, s.k_utility, step=1, label="k_utility: neurons to suppress")
                C["protect_top"] = gr.Slider(0, 20_000, s.protect_top, step=1, label="protect_top: benign-critical neurons never amplified")
                C["counts"] = gr.Markdown("")
                with gr.Accordion("Selection rules", open=False):
                    gr.Markdown(RULES)
            C["dist_tune"] = gr.Plot(plots.empty("", 300), label="Selection per layer")
        with gr.Accordion("Training settings (from the preset)", open=False):
            with gr.Row():
                C["mode"] = gr.Radio(["fomaml", "reptile", "joint"], value=m.mode, label="meta-learning mode")
                C["steps"] = gr.Slider(1, 200, m.steps, step=1, label="steps")
                C["lam_kl"] = gr.Slider(0, 5, m.lam_kl, step=0.1, label="λ KL (keep benign answers)")
                C["mu_over_refusal"] = gr.Slider(0, 5, m.mu_over_refusal, step=0.1, label="μ over-refusal penalty")
                C["max_gain"] = gr.Slider(1, 8, m.max_gain, step=0.5, label="max gain")
        with gr.Row():
            train_btn = gr.Button("Train gains", variant="primary", scale=3)
            train_stop = gr.Button("Stop", variant="stop", scale=1)
        C["train_status"] = gr.Markdown("")
        C["loss_plot"] = gr.Plot(plots.losses([]), label="Losses", elem_id="loss-plot")
        with gr.Accordion("Other gains: fixed preview, a file, or an earlier run", open=False):
            with gr.Row():
                safety_gain = gr.Slider(1, 4, 2.0, step=0.1, label="fixed safety gain")
                utility_gain = gr.Slider(0, 1, 0.5, step=0.05, label="fixed over-refusal gain")
                fixed_btn = gr.Button("Use fixed gains")
            with gr.Row():
                gains_upload = gr.File(label="modulation.safetensors (+ its gate.safetensors, if any)", file_types=[".safetensors"],
                                       file_count="multiple", type="filepath", height=90)
                file_btn = gr.Button("Load gains file")
            with gr.Row():
                C["recent_runs"] = gr.Dropdown([], label="Finished trainings of this model (any session)", scale=3)
                refresh_btn = gr.Button("↻", scale=0, min_width=50)
                use_btn = gr.Button("Use these gains", scale=1)
        C["gains_status"] = gr.Markdown("")

    def wire():
        session = page.session
        sel_in = [session, C["k_safety"], C["k_utility"], C["protect_top"], *page.view_in]
        for comp, api in ((C["k_safety"], "select"), (C["k_utility"], None), (C["protect_top"], None)):
            comp.input(**page.bind(handlers.on_select, api, view=True, **FAST), inputs=sel_in)
        meta_in = [session, *(C[n] for n in ("mode", "steps", "lam_kl", "mu_over_refusal", "max_gain"))]
        for name in ("steps", "mode", "lam_kl", "mu_over_refusal", "max_gain"):
            C[name].input(**page.bind(handlers.on_meta, "training_settings" if name == "steps" else None, **QUIET), inputs=meta_in)
        train_btn.click(**page.bind(background.train, "train", view=True, **JOBS), inputs=[session, *page.view_in])
        train_stop.click(**page.bind(ENDPOINTS["stop_train"], "stop_train", **QUIET), inputs=[session])
        fixed_btn.click(**page.bind(handlers.fixed_gains, "fixed_gains", view=True, **QUIET), inputs=[session, safety_gain, utility_gain, *page.view_in])
        file_btn.click(**page.bind(handlers.gains_file, "gains_file", view=True, **QUIET), inputs=[session, gains_upload, *page.view_in])
        refresh_btn.click(**page.bind(handlers.recent_runs, "refresh_runs", **QUIET), inputs=[session])
        use_btn.click(**page.bind(handlers.use_run, "use_run", view=True, **QUIET), inputs=[session, C["recent_runs"], *page.view_in])
    return wire


def compare_tab(page: Page) -> Callable[[], None]:
    C, first = page.C, page.first
    with gr.Tab("4 · Compare", id="compare"):
        gr.Markdown(HOW["compare"], elem_classes="how")
        with gr.Row():
            C["active_gains"] = gr.Markdown(handlers.gains_text(first))
            with gr.Column(scale=0, min_width=340):
                strength = gr.Slider(0, 3, 1.0, step=0.05, label="strength ×", info="what-if: 0 = base, 1 = as tuned, 2 = twice the change")
                C["use_gate"] = gr.Checkbox(**handlers.gate_props(first), elem_id="use-gate",
                                            info="on: the gains are scaled by the gate's s for each prompt; off: what Export folds into the weights")
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("Base model", elem_classes="pane-title")
                C["left"] = gr.Chatbot(label="Base model", show_label=False, height=420, elem_id="pane-base", buttons=["copy"])
            with gr.Column():
                gr.Markdown("NeuronTune (modulated)", elem_classes="pane-title")
                C["right"] = gr.Chatbot(label="NeuronTune", show_label=False, height=420, elem_id="pane-tuned", buttons=["copy"])
        with gr.Row():
            C["msg"] = gr.Textbox(placeholder="Ask both models… (Enter sends)", show_label=False, scale=5, max_lines=6)
            send_btn = gr.Button("Send", variant="primary", scale=1)
            clear_btn = gr.Button("Clear", scale=1)
        picks = chat.examples(page.studio, first)
        gr.Examples([[p] for _, p in picks], inputs=[C["msg"]], example_labels=[l for l, _ in picks], label="Quick picks (held-out prompts)", examples_per_page=20)
        with gr.Accordion("Decoding (same for both panes)", open=False):
            with gr.Row():
                max_new = gr.Slider(8, 256, 64, step=8, label="max new tokens")
                sample = gr.Checkbox(False, label="sample (greedy when off; with sampling the panes also differ by chance)")
                temperature = gr.Slider(0.1, 1.5, 0.7, step=0.05, label="temperature")
            compare_judge = gr.Dropdown(judging.CHOICES, value="rules", allow_custom_value=True, label="refusal judge",
                                        info="rules (fast), or model:NAME, a local chat model labelling each answer (the rules "
                                             "give a second opinion); for the chat's verdict lines and the bulk table")
        C["chat_status"] = gr.Markdown("", elem_id="chat-status")
        with gr.Accordion("Your prompts, in bulk: base vs tuned on a list", open=False):
            gr.Markdown("A .txt file (one prompt per line), a .csv / .jsonl / .json / .parquet with a `prompt` column, or a pasted "
                        "list (one per line); at most 200 prompts. Both models answer in batched calls with the strength, gate "
                        "and max new tokens above; sort the table by any column.", elem_classes="how")
            with gr.Row():
                bulk_upload = gr.File(label="prompt file", file_types=[".txt", ".csv", ".json", ".jsonl", ".parquet"], type="filepath",
                                      height=90, scale=1)
                bulk_text = gr.Textbox(label="or paste prompts, one per line", lines=4, max_lines=12, scale=2)
            with gr.Row():
                bulk_btn = gr.Button("Run base vs tuned", variant="primary", scale=3)
                bulk_stop = gr.Button("Stop", variant="stop", scale=1)
                bulk_only = gr.Checkbox(False, label="only where the judges differ", scale=1,
                                        info="with a model judge: the prompts where it and the rules decide differently")
            C["bulk_status"] = gr.Markdown("", elem_id="bulk-status")
            C["bulk_table"] = gr.Dataframe(label="Your prompts: base vs tuned", interactive=False, wrap=True, max_height=480,
                                           column_widths=["20%", "11%", "11%", "6%", "26%", "26%"], elem_id="bulk-table")
            C["bulk_file"] = gr.File(label="Download (CSV)", interactive=False)

    def wire():
        session, studio = page.session, page.studio
        chat_in = [session, C["msg"], strength, max_new, sample, temperature, C["use_gate"], compare_judge]
        chat_kw = dict(concurrency_id="chat", concurrency_limit=studio.chat_limit, show_progress="minimal", gpu=True)
        send_btn.click(**page.bind(chat.chat, "chat", **chat_kw), inputs=chat_in)
        C["msg"].submit(**page.bind(chat.chat, None, **chat_kw), inputs=chat_in)
        clear_btn.click(**page.bind(chat.clear, "clear_chat", **QUIET), inputs=[session])
        bulk_btn.click(**page.bind(bulk.run_bulk, "bulk", **JOBS), inputs=[session, bulk_upload, bulk_text, strength, max_new, C["use_gate"],
                                                                           compare_judge, bulk_only])
        bulk_only.change(**page.bind(bulk.filter_bulk, "filter_bulk", **QUIET), inputs=[session, bulk_only])
        bulk_stop.click(**page.bind(ENDPOINTS["stop_bulk"], "stop_bulk", **QUIET), inputs=[session])
    return wire


def evaluate_tab(page: Page) -> Callable[[], None]:
    C = page.C
    with gr.Tab("5 · Evaluate", id="evaluate"):
        gr.Markdown(HOW["evaluate"], elem_classes="how")
        with gr.Row():
            eval_quick = gr.Checkbox(True, label="quick (fewer prompts)")
            baselines = gr.CheckboxGroup(["joint", "fomaml", "attribution_only", "random", "direction"], value=["attribution_only"], label="baselines")
            eval_split = gr.Radio(["validation", "test"], value="validation", label="split",
                                  info="validation while choosing settings; test for the table you report (read it once)")
            eval_judge = gr.Dropdown(judging.CHOICES, value="rules", allow_custom_value=True, label="refusal judge",
                                     info="rules, or model:NAME (the rules then give a second opinion: the table shows "
                                          "the judges' agreement)")
            eval_btn = gr.Button("Run evaluation", variant="primary")
            eval_stop = gr.Button("Stop", variant="stop")
        C["eval_status"] = gr.Markdown("")
        C["eval_table"] = gr.Dataframe(label="Metrics: base, NeuronTune, baselines", interactive=False, elem_id="eval-table")
        with gr.Row():
            grid = gr.Textbox("250:0, 750:250, 1500:500", label="sweep grid (k_safety:k_utility, …)", scale=3)
            sweep_judged = gr.Checkbox(False, label="judge answers (every validation group; minutes a point)", scale=1)
            sweep_btn = gr.Button("Run sweep", scale=1)
        with gr.Row():
            C["tradeoff"] = gr.Plot(plots.empty("Run a sweep to see the safety / over-refusal trade-off.", 360), label="Trade-off",
                                    elem_id="tradeoff", scale=3)
            with gr.Column(scale=2):
                C["points"] = gr.Dataframe(label="Sweep points (click a row)", interactive=False, max_height=260, elem_id="points")
                with gr.Row():
                    point_index = gr.Number(None, label="point", precision=0, minimum=0, elem_id="point-index", scale=1)
                    pick_btn = gr.Button("Use this point", elem_id="pick-btn", scale=2)
                C["pick_status"] = gr.Markdown("", elem_id="pick-status")
                with gr.Row():
                    to_compare = gr.Button("→ Compare", size="sm")
                    to_export = gr.Button("→ Export", size="sm")
        C["eval_samples"] = gr.Dataframe(label="Sample generations", interactive=False, wrap=True, max_height=420)

    def wire():
        session, studio = page.session, page.studio
        eval_btn.click(**page.bind(background.evaluate, "evaluate", **JOBS), inputs=[session, eval_quick, baselines, eval_split, eval_judge])
        eval_stop.click(**page.bind(ENDPOINTS["stop_evaluate"], "stop_evaluate", **QUIET), inputs=[session])
        sweep_btn.click(**page.bind(background.sweep, "sweep", **JOBS), inputs=[session, grid, sweep_judged])
        pick_kw = page.bind(picker.pick_point, "pick_point", view=True, **QUIET)
        pick_btn.click(**pick_kw, inputs=[session, point_index, *page.view_in])

        def row_pick(se, kind, layer, top, evt: gr.SelectData):
            return {C[k]: v for k, v in picker.pick_row(studio, se, evt.row_value, View.of(kind, layer, top)).items()}
        C["points"].select(row_pick, inputs=[session, *page.view_in], outputs=pick_kw["outputs"], show_progress="hidden", api_visibility="private")
        to_compare.click(lambda: gr.Tabs(selected="compare"), outputs=[C["tabs"]], api_visibility="private")
        to_export.click(lambda: gr.Tabs(selected="export"), outputs=[C["tabs"]], api_visibility="private")
    return wire


def export_tab(page: Page) -> Callable[[], None]:
    C = page.C
    with gr.Tab("6 · Export", id="export"):
        gr.Markdown(HOW["export"], elem_classes="how")
        with gr.Row():
            C["export_name"] = gr.Textbox(handlers.suggest_name(page.first), label="Export name (letters, digits, . _ -; anything else is replaced)", scale=3)
            overwrite = gr.Checkbox(False, label="overwrite an existing export", scale=1)
            measure = gr.Checkbox(True, label="measure the checkpoint (minutes on a CPU)", scale=2,
                                  info="reload it (a GGUF file: read back by transformers) and evaluate it on the test split, "
                                       "so the model card carries its own figures")
        export_format = gr.Radio([("transformers checkpoint (safetensors)", "transformers"), ("GGUF (llama.cpp, Ollama, LM Studio)", "gguf")],
                                 value="transformers", label="Format")
        with gr.Accordion("Push to the Hugging Face Hub (optional)", open=False):
            with gr.Row():
                repo = gr.Textbox(label="repo id", placeholder="you/model-neurontune")
                C["hub_token"] = gr.Textbox(label="token (used for this push only; never stored)", type="password")
        export_btn = gr.Button("Export", variant="primary")
        C["export_status"] = gr.Markdown("")
        C["export_files"] = gr.File(label="Download: modulation file and model card", file_count="multiple", interactive=False)

    def wire():
        export_btn.click(**page.bind(background.export, "export", concurrency_id="export", concurrency_limit=1, show_progress="hidden"),
                         inputs=[page.session, C["export_name"], overwrite, repo, C["hub_token"], export_format, measure])
    return wire


TABS = (model_tab, explore_tab, tune_tab, compare_tab, evaluate_tab, export_tab)


def build_app(studio: Studio) -> gr.Blocks:
    """The page: a header, the six tabs, their wiring, and `on_load` drawing each new page's session."""
    page = Page(studio)
    with gr.Blocks(title="NeuronTune Studio") as demo:
        page.session = gr.State(lambda: studio.new_session())  # called once per session: a page's or an API client's
        gr.Markdown("# NeuronTune Studio\nFind the MLP neurons that make a chat model refuse, amplify the safety neurons, "
                    "suppress the over-refusal ones, and watch the effect live (Pan et al., 2025).")
        with gr.Tabs() as page.C["tabs"]:
            wires = [tab(page) for tab in TABS]
        for wire in wires:
            wire()
        for tab in demo.blocks.values():  # plotly sizes a figure drawn in a hidden tab to 0: redraw on show
            if isinstance(tab, gr.Tab):
                tab.select(fn=None, js="() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 60); }", api_visibility="private")
        demo.load(**page.bind(on_load, "on_load", view=True, **QUIET), inputs=[page.session, *page.view_in])
    return demo


def private_folders(studio: Studio) -> list[str]:
    """The folders the studio writes (exports, runs, caches), for `blocked_paths`; one that holds Gradio's
    upload folder or the temp folder (where download copies go) is left out, or nothing could be served."""
    served = [Path(get_upload_folder()).resolve(), Path(tempfile.gettempdir()).resolve()]
    folders = [Path(p).resolve() for p in (studio.export_root, studio.runs_dir, studio.cache_dir)]
    return [str(f) for f in folders if not any(s == f or f in s.parents for s in served)]


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Queue (heavy work waits visibly), then serve. Returns what `Blocks.launch` returns.

    No `allowed_paths`: the page serves only Gradio's own upload/cache folder (downloads are copies placed
    there). The folders the studio writes to are blocked outright, in case one of them lies inside it."""
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    theme = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose")
    kwargs["blocked_paths"] = [*private_folders(studio), *(kwargs.get("blocked_paths") or [])]
    return demo, demo.launch(server_name=host, server_port=port, theme=theme, css=CSS, js=CLICKS_JS, show_error=True, **kwargs)
