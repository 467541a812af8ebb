"""Command line: `python -m neurontune {attribute,tune,evaluate,sweep,separability,neuron,snapshot,export,generate} --help`.

Every command drives the same engine as the studio, shows a progress bar and ends with a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .infra.progress import Reporter


class _Bars(Reporter):
    """The CLI's reporter: a tqdm bar per phase (under `accelerate launch`: on the main process only, counting its
    own share of the work), training steps with their losses, messages printed above the bars."""

    def __init__(self, phase: str | None = None):
        super().__init__()
        self.bar = None
        if phase is not None:
            self.phase(phase)

    def phase(self, name: str, total: int | None = None) -> None:
        from .infra.distributed import is_main
        self.close()
        self.bar = tqdm(total=total or 1, desc=name, unit="ex", dynamic_ncols=True, disable=not is_main())

    def progress(self, done: int, total: int, stage: str = "") -> None:
        if self.bar is None:
            self.phase("")
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(stage[:28])
        self.bar.refresh()

    def step(self, entry: dict) -> None:
        if self.bar is None:
            self.phase("training")
        self.bar.unit = "step"
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k in ("loss", "refusal_nll", "kl", "over_refusal", "val")})

    def say(self, message: str) -> None:
        from .infra.distributed import is_main
        if is_main():
            tqdm.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct, default), 'tiny-llama', 'tiny-gpt2', a hub id, a local directory or a .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="weights dtype (default float32)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cpu)")
    p.add_argument("--device-map", default=None, help="'auto' shards a large model over all GPUs (accelerate)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default: only for repos you trust)")
    p.add_argument("--cache-dir", default=None, help="where the dequantised embedded model and attribution results are cached (default ~/.cache/neurontune or $NEURONTUNE_CACHE)")


def _whole(minimum: int, what: str):
    """An argparse type: a whole number of at least `minimum`, refused with a message that says what to give."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number ({what}), not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} ({what}), not {value}")
        return value
    return parse


def _preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="balanced", help="preset name (security-critical, balanced, utility-priority) or a .json path")
    p.add_argument("--k-safety", type=_whole(0, "a number of neurons, 0 or more"), default=None, help="number of safety neurons to amplify (overrides the preset)")
    p.add_argument("--k-utility", type=_whole(0, "a number of neurons, 0 or more"), default=None, help="number of over-refusal neurons to suppress (overrides the preset)")
    p.add_argument("--mode", choices=["fomaml", "reptile", "joint"], default=None, help="meta-learning mode (overrides the preset)")
    p.add_argument("--steps", type=_whole(1, "training steps, 1 or more"), default=None, help="outer training steps (overrides the preset)")
    p.add_argument("--seed", type=int, default=None, help="random seed for data sampling and training")


def _load(args):
    from .infra import distributed
    from .model.loading import load_model
    if args.device is None and args.device_map is None and distributed.device() is not None:
        args.device = str(distributed.device())  # `accelerate launch --multi_gpu`: one GPU per process
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)


def _judge_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="rules", metavar="rules|model:PATH_OR_ID",
                   help="what reads the answers: 'rules' (default, fast) or 'model:PATH_OR_ID', a local chat model that labels each "
                        "answer refuse / partial / comply (cached; the rules give a second opinion and the tables show both "
                        "judges' agreement), e.g. model:embedded or model:/models/Llama-3.1-8B-Instruct")


def _judge(args):
    """The judge of --judge, built after a bad spec is refused (a model judge loads its model here)."""
    from .eval.judges import describe, judge_from_spec
    judge = judge_from_spec(args.judge, cache_dir=args.cache_dir, dtype=args.dtype, device=args.device,
                            trust_remote_code=args.trust_remote_code)
    print(describe(judge), file=sys.stderr)
    return judge


def _check_judge(spec: str) -> None:
    from .eval.judges import check_spec
    check_spec(spec)  # a malformed --judge is refused before any model loads


def _config(args):
    from .config import load_preset
    cfg = load_preset(args.preset).replace(model=args.model)
    sel = {k: v for k, v in (("k_safety", args.k_safety), ("k_utility", args.k_utility)) if v is not None}
    meta = {k: v for k, v in (("mode", args.mode), ("steps", args.steps), ("seed", args.seed)) if v is not None}
    return cfg.replace(selection=sel, meta=meta)


def cmd_attribute(args) -> int:
    from .config import AttributionConfig, with_prompts
    from .run.steps import attribute_step
    cfg = _config(args).replace(attribution=AttributionConfig(method=args.method, ig_steps=args.ig_steps, batch_size=args.batch_size))
    if args.n_prompts:
        cfg = with_prompts(cfg, args.n_prompts)
    lm = _load(args)
    start = time.perf_counter()
    with _Bars() as bars:
        scores = attribute_step(lm, cfg, Path(args.out), reporter=bars, cache_dir=args.cache_dir)
    from .infra.distributed import is_main
    from .run.folder import RunFolder
    if not is_main():  # under `accelerate launch` the main process writes and reports
        return 0
    out = RunFolder(args.out)
    print(f"\nScored {scores.shape[0]} layers x {scores.shape[1]} neurons on {sum(scores.counts.values())} examples "
          f"in {time.perf_counter() - start:.1f} s ({'cached' if 'cache' in scores.meta and time.perf_counter() - start < 5 else 'computed'}).")
    print("Top safety neurons:\n" + scores.table("safety", 10).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    mass = scores.layer_summary("safety")
    print("Safety score mass by layer (positive part):\n" + " ".join(f"L{l}:{m:.2f}" for l, m in zip(mass.layer, mass.positive_mass)))
    print(f"Wrote {out.path}/ ({', '.join((out.SCORES, out.TOP_NEURONS, out.LAYERS, out.ATTRIBUTION))})")
    return 0


def _baselines(text: str) -> tuple[str, ...]:
    """--baselines: 'none', 'all' or a comma list (checked against the known names before any work)."""
    from .eval.baselines import BASELINES
    text = text.strip()
    if text in ("none", ""):
        return ()
    return BASELINES if text == "all" else tuple(b.strip() for b in text.split(",") if b.strip())


def cmd_tune(args) -> int:
    from .run.folder import RunFolder
    from .run.tune import check, tune
    cfg, baselines = _config(args), _baselines(args.baselines)
    check(cfg, baselines=baselines)  # bad thresholds and baselines are refused before the model loads...
    _check_judge(args.judge)
    lm = _load(args)  # ...and thresholds too large for this model before attribution (in tune)
    judge = _judge(args) if not args.no_eval else None
    with _Bars() as bars:
        tune(lm, cfg, args.out, evaluate=not args.no_eval, quick_eval=args.quick_eval, baselines=baselines,
             eval_split=args.eval_split, cache_dir=args.cache_dir, reporter=bars, judge=judge)
    print(f"Wrote {args.out}/ ({RunFolder.MODULATION}, {RunFolder.TRAIN_LOG}, {RunFolder.CONFIG}, {RunFolder.SCORES} ...)")
    return 0


def cmd_evaluate(args) -> int:
    from .eval.baselines import check_baselines
    from .run.evaluate_run import evaluate_run
    from .run.folder import RunFolder
    cfg = RunFolder(args.run).config()
    baselines = _baselines(args.baselines)
    check_baselines(baselines)  # before the model loads
    _check_judge(args.judge)
    args.model = cfg.model if args.model == "embedded" else args.model
    lm = _load(args)
    judge = _judge(args)
    with _Bars() as bars:
        evaluate_run(lm, args.run, cfg, baselines=baselines, quick=args.quick, seeds=args.seeds, split=args.split,
                     cache_dir=args.cache_dir, reporter=bars, judge=judge)
    return 0


def cmd_sweep(args) -> int:
    from .run.sweep import parse_grid, sweep_run
    cfg = _config(args)
    grid = parse_grid(args.grid)  # refused before the model loads
    lm = _load(args)
    with _Bars() as bars:
        sweep_run(lm, cfg, grid, Path(args.out), judged=args.judged, cache_dir=args.cache_dir, reporter=bars)
    return 0


def cmd_export(args) -> int:
    import os

    from .run.export import export
    from .run.folder import RunFolder
    folder = RunFolder(args.run)
    cfg = folder.config()
    if not folder.has(RunFolder.MODULATION):
        raise SystemExit(f"{args.run} holds no trained gains ({RunFolder.MODULATION}); run `tune` first.")
    _check_judge(args.judge)
    args.model = cfg.model if args.model == "embedded" else args.model
    lm = _load(args)
    gated = folder.has(RunFolder.GATE)
    token = os.environ.get("HF_TOKEN") if args.push_to_hub else None
    with _Bars() as bars:
        result = export(lm, folder.exported(lm.fingerprint), args.root, args.name, format=args.format, gguf_type=args.gguf_type,
                        preset=cfg.to_dict(), eval_summary=folder.eval_summary(), gated=gated, overwrite=args.overwrite,
                        push_to_hub=args.push_to_hub, token=token, reporter=bars,
                        measure=None if args.no_eval else args.eval_split,
                        judge=None if args.no_eval else _judge(args))
    if (g := result["gguf"]) is not None:
        changed = ", ".join(f"{n} as {t}" for t, n in sorted(g["changed_types"].items())) or "none"
        print(f"Exported {Path(result['path']) / g['file']} ({g['size_mb']:.1f} MB; tensors the gains changed: {changed}; "
              f"{g['copied']} copied as they were). Reloaded by transformers: every weight within its type's rounding; "
              f"vs the hooked model: max logit diff {g['max_logit_diff']:.3f}, same top token at {g['top1_agreement']:.1%} of positions.")
        for note in g["notes"]:
            print(f"note: {note}", file=sys.stderr)
        print(f"Run it with llama.cpp: llama-cli -m {Path(result['path']) / g['file']}")
    else:
        print(f"Exported to {result['path']} (reloaded logits match the hooked model: max diff {result['max_logit_diff']:.2e}).")
    if gated:
        held = ("its foldable modulation, trained without a gate for export" if folder.has(RunFolder.FOLDABLE) else
                "its STATIC gains only (not the gated form)")
        print(f"note: this run has an input gate, which cannot be folded into weights: the checkpoint holds {held}; "
              "the model card says so.", file=sys.stderr)
    if result["push_error"]:
        print(result["push_error"], file=sys.stderr)
    elif result["pushed"]:
        print(f"Pushed to the Hub: {result['pushed']}")
    if result["gguf"] is None:
        print(f"Load it with: AutoModelForCausalLM.from_pretrained({result['path']!r})")
    return 0


def cmd_generate(args) -> int:
    from .data.prompts import DataError
    from .eval.judge import PARTIAL, REFUSALS
    from .eval.judges import agreement
    from .infra import files
    from .interventions.protocol import FORMS
    from .run.answer import answer, intervention_for, judge_answers
    rows = []
    with open(args.prompts, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append({"id": row.get("id", n - 1), "prompt": str(row["prompt"])})
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise DataError(f"{args.prompts}:{n}: each line must be a JSON object with a 'prompt' ({exc}).") from exc
    if not rows:
        raise DataError(f"{args.prompts} holds no prompts.")
    _check_judge(args.judge)
    lm = _load(args)
    intervention, form = (None, None)
    if args.modulation:
        intervention, form = intervention_for(lm, args.modulation, args.form)
    elif args.form:
        raise DataError("--form applies a run's modulation: give the run with --modulation.")
    applied = f"the run's modulation, {FORMS[form]}" if form else "the base model"
    print(f"Generating with {applied}.")
    prompts = [r["prompt"] for r in rows]
    with _Bars("generate") as bars:
        answers, strengths = answer(lm, prompts, intervention, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    reporter=bars)
    judge = _judge(args)
    verdicts, second = judge_answers(prompts, answers, judge)
    files.write_jsonl(args.out, ({"id": r["id"], "prompt": r["prompt"], "response": a, "form": form or "base", "verdict": v,
                                  "judge": judge.name,
                                  **({"second_verdict": v2, "second_judge": judge.second.name} if v2 is not None else {}),
                                  **({"gate": s} if strengths is not None else {})}
                                 for r, a, v, v2, s in zip(rows, answers, verdicts, second or [None] * len(rows),
                                                           strengths or [None] * len(rows))))
    refused, partial = sum(v in REFUSALS for v in verdicts), sum(v == PARTIAL for v in verdicts)
    mean_s = f"; mean gate reading {sum(strengths) / len(strengths):.2f}" if strengths else ""
    agree = ""
    if second is not None:
        same, n = agreement(verdicts, second)
        agree = f"; the {judge.second.name} judge agrees on {same}/{n} ({same / n:.0%})"
    print(f"Wrote {len(rows)} responses to {args.out} ({form or 'base'}{mean_s}; {judge.name} judge: {refused}/{len(rows)} "
          f"refusals, {partial} of them partial{agree}).")
    return 0


def cmd_separability(args) -> int:
    from .config import load_preset
    from .data.splits import build_splits
    from .eval.separability import probe_ceiling, summary
    if not 0 < args.fpr < 1:
        raise ValueError(f"--fpr is a share of harmless prompts, strictly between 0 and 1, not {args.fpr}.")
    lm = _load(args)
    start = time.perf_counter()
    with _Bars("separability") as bars:
        table = probe_ceiling(lm, build_splits(load_preset(args.preset).data), split=args.split, fpr=args.fpr, reporter=bars)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{args.split} split, {lm.name}: " + summary(table, args.fpr) + f" ({time.perf_counter() - start:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"Wrote {args.out}.")
    return 0


def cmd_neuron(args) -> int:
    from .data.splits import build_splits
    from .eval.neuron_card import CardEngine, role_of
    from .method.selection import select
    from .run.folder import RunFolder
    folder = RunFolder(args.run)
    cfg = folder.config()
    scores = folder.scores()
    if scores is None:
        raise FileNotFoundError(f"{args.run} holds no neuron scores ({RunFolder.SCORES}); run `attribute --out {args.run}` or `tune` first.")
    args.model = cfg.model if args.model == "embedded" else args.model
    lm = _load(args)
    n_layers, n_neurons = lm.shape
    if args.layer >= n_layers or args.index >= n_neurons:
        raise ValueError(f"No neuron {args.layer}:{args.index}: {lm.name} has layers 0–{n_layers - 1} and neurons 0–{n_neurons - 1} per layer.")
    mod = folder.modulation(lm.fingerprint)
    gain = float(mod.dense()[args.layer, args.index]) if mod is not None else None
    engine = CardEngine(lm, scores, build_splits(cfg.data), cache_dir=args.cache_dir)
    card = engine.card(args.layer, args.index, gain=gain, role=role_of(select(scores, cfg.selection), args.layer, args.index))
    print(card.to_text(args.k))
    print(f"\n({card.seconds['total']:.2f} s: activations {card.seconds['activations']:.2f}, tokens {card.seconds['tokens']:.2f}, "
          f"refusal effect {card.seconds['effect']:.2f})")
    return 0


def cmd_snapshot(args) -> int:
    from .config import load_preset
    from .run.snapshot import SHIPPED_DIR, check_snapshot, snapshot_run
    from .run.tune import check, tune
    lm, out = None, args.out or SHIPPED_DIR
    run = args.run
    if run is None:  # the one command: tune the preset (quick evaluation), then snapshot it
        cfg = load_preset(args.preset).replace(model=args.model)
        check(cfg)
        lm = _load(args)
        run = args.work or f"runs/snapshot-{cfg.name}"
        with _Bars() as bars:
            tune(lm, cfg, run, quick_eval=True, cache_dir=args.cache_dir, reporter=bars)
    manifest = snapshot_run(run, out, command="python -m neurontune " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["snapshot"]
                            else "python -m neurontune snapshot")
    problems = check_snapshot(out, lm)
    print(f"Wrote {out}/ from {run}: {manifest['bytes'] / 1e6:.2f} MB in {len(manifest['files'])} files, scores as "
          f"{manifest['scores_dtype']} (selection unchanged: {manifest['selection_unchanged']}, largest relative change "
          f"{manifest['max_relative_change']:.1e}).")
    if problems:
        print("warning: " + "; ".join(problems), file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m neurontune", description="NeuronTune: find, tune and export the neurons behind refusal.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attribute", help="score every MLP neuron for safety and utility")
    _model_args(p); _preset_args(p)
    p.add_argument("--out", required=True, help="run folder to write (scores.safetensors, top_neurons.csv, layer_summary.csv)")
    p.add_argument("--method", default="grad_x_act", choices=["grad_x_act", "integrated_gradients"], help="attribution method")
    p.add_argument("--ig-steps", type=int, default=8, help="integration steps for integrated_gradients")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward/backward pass")
    p.add_argument("--n-prompts", type=int, default=None, help="use about this many prompts per group (default: the preset's)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("tune", help="attribution + selection + meta-learned gains (+ evaluation) into --out")
    _model_args(p); _preset_args(p)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--quick-eval", action="store_true", help="a smaller evaluation (for a first look)")
    p.add_argument("--baselines", default="none", help="also fit and evaluate baselines in the same run: comma list of "
                   "joint,fomaml,attribution_only,random,direction, 'all', or 'none' (default)")
    p.add_argument("--eval-split", default="validation", choices=["validation", "test"],
                   help="the split the closing evaluation reads (default validation: keep test for the reported table)")
    _judge_arg(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="evaluate a run's modulation against the base model and baselines")
    _model_args(p)
    p.add_argument("--run", required=True, help="run folder written by `tune`")
    p.add_argument("--baselines", default="all", help="comma list of joint,fomaml,attribution_only,random,direction (the run's own mode is skipped), 'all' (default) or 'none'")
    p.add_argument("--quick", action="store_true", help="fewer prompts (for a first look)")
    p.add_argument("--seeds", type=_whole(1, "training seeds, 1 or more"), default=3,
                   help="train NeuronTune and the trained baselines with this many seeds; the table shows mean ± sd (default 3)")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="test (default: the reported table, read once) or validation (while choosing settings)")
    _judge_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="safety-utility trade-off over a grid of (k_safety, k_utility)")
    _model_args(p); _preset_args(p)
    p.add_argument("--grid", default="250:0,750:250,1500:500,3000:1000", help="comma list of k_safety:k_utility")
    p.add_argument("--out", required=True, help="folder for sweep.csv and tradeoff.html")
    p.add_argument("--judged", action="store_true",
                   help="judge short answers on every validation prompt group (minutes a point) instead of the first-token "
                        "refusal proxy (seconds a point, a relative signal)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("separability", help="how well each layer's prompt-end residual separates harmful from harmless "
                       "prompts (a linear probe fitted on train): a ceiling for any prompt-blind intervention")
    _model_args(p)
    p.add_argument("--preset", default="balanced", help="preset whose data settings give the pools (default balanced)")
    p.add_argument("--split", default="validation", choices=["validation", "test"], help="split the probe is scored on (default validation)")
    p.add_argument("--fpr", type=float, default=0.05, help="share of harmless prompts the threshold may flag (default 0.05)")
    p.add_argument("--out", default=None, help="also write the per-layer table to this CSV file")
    p.set_defaults(func=cmd_separability)

    p = sub.add_parser("neuron", help="one neuron's card: scores and ranks, the prompts that make it fire, the tokens it promotes, its refusal effect")
    _model_args(p)
    p.add_argument("--run", required=True, help="run folder with scores (from `tune` or `attribute`)")
    p.add_argument("--layer", required=True, type=_whole(0, "a layer number"), help="layer of the neuron")
    p.add_argument("--index", required=True, type=_whole(0, "a neuron index"), help="index of the neuron in its layer")
    p.add_argument("--k", type=_whole(1, "rows"), default=5, help="prompts shown at each end of the activation ranking (default 5)")
    p.set_defaults(func=cmd_neuron)

    p = sub.add_parser("snapshot", help="make the run the studio ships and opens on: tune the preset (quick evaluation) "
                       "and copy its small files (no weights) into assets/default_run")
    _model_args(p)
    p.add_argument("--preset", default="balanced", help="preset to tune (default balanced)")
    p.add_argument("--run", default=None, help="snapshot this existing run folder instead of tuning a new one")
    p.add_argument("--work", default=None, help="run folder the tuning writes (default runs/snapshot-PRESET)")
    p.add_argument("--out", default=None, help="snapshot folder (default assets/default_run, what the studio opens)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("export", help="fold a run's modulation into the weights and save a standard checkpoint or a GGUF file")
    _model_args(p)
    _judge_arg(p)
    p.add_argument("--run", required=True, help="run folder written by `tune`")
    p.add_argument("--name", required=True, help="export folder name (letters, digits, . _ -)")
    p.add_argument("--root", default="exports", help="folder that holds exports (default ./exports)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of that name")
    p.add_argument("--format", default="transformers", choices=["transformers", "gguf"],
                   help="transformers (safetensors checkpoint, default) or gguf (one file for llama.cpp / Ollama / LM Studio)")
    p.add_argument("--gguf-type", default="auto", choices=["auto", "f16", "q8_0"],
                   help="with --format gguf: auto (a GGUF model's own types, re-quantised where the gains changed it; "
                   "F16 for a transformers model), f16 or q8_0 (the type of every tensor written anew)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload to this Hub repo (token from $HF_TOKEN, never stored)")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"],
                   help="the model card's figures: the checkpoint reloaded with plain transformers (a GGUF file: read back by transformers), measured on this split (default test)")
    p.add_argument("--no-eval", action="store_true", help="skip measuring the reloaded checkpoint (the card then quotes the run's evaluation)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="answer a JSONL of prompts (batched, greedy) with or without a modulation")
    _model_args(p)
    p.add_argument("--modulation", default=None, help="a run folder from `tune --out` (its gate is used when it has one) "
                   "or a modulation.safetensors file")
    p.add_argument("--form", choices=["static", "conditional", "gated"], default=None,
                   help="how to apply the run's modulation: static gains, conditional (gains + input-side terms, what export "
                        "folds), or gated (behind the run's input gate); default: the richest form the run has")
    p.add_argument("--prompts", required=True, help="JSONL input: one {\"prompt\": ..., \"id\": optional} per line")
    p.add_argument("--out", required=True, help="JSONL output: {\"id\", \"prompt\", \"response\"} per line")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per answer (default 48)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    _judge_arg(p)
    p.set_defaults(func=cmd_generate)
    return parser


DISTRIBUTED_COMMANDS = ("attribute", "evaluate")  # the ones `accelerate launch` shares over processes


def main(argv: list[str] | None = None) -> int:
    from .infra import distributed
    args = build_parser().parse_args(argv)
    if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
        print(f"error: `{args.command}` runs in one process; only {' and '.join(DISTRIBUTED_COMMANDS)} are shared over "
              f"the processes of `accelerate launch`. Run `python -m neurontune {args.command} ...`.", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # our errors carry what to do; no traceback for bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
