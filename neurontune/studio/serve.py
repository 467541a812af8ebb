"""Start the studio: `neurontune-studio` (installed), `python app.py` (a checkout or a Hugging Face Space) and
`python -m neurontune.studio` all run `main` (it reads PORT / GRADIO_SERVER_NAME on a Space and uses the GPU when
one is present)."""
from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description="NeuronTune Studio: explore, tune and export the neurons behind refusal.")
    p.add_argument("--model", default=os.environ.get("NEURONTUNE_MODEL", "embedded"), help="embedded (default), tiny-llama, a Hub id or a local path")
    p.add_argument("--preset", default="balanced", help="preset name or .json path")
    p.add_argument("--full", action="store_true", help="start with the preset's full prompt counts instead of the quick first look")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--cache-dir", default=None, help="models, attribution and job status (default ~/.cache/neurontune or $NEURONTUNE_CACHE)")
    p.add_argument("--runs-dir", default="runs/studio", help="where training and evaluation runs are written")
    p.add_argument("--export-root", default="exports", help="where exports are written")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    import torch

    from . import Studio, launch

    device = "cuda" if torch.cuda.is_available() else None
    studio = Studio(args.model, args.preset, quick_default=not args.full, cache_dir=args.cache_dir, runs_dir=args.runs_dir,
                    export_root=args.export_root, device=device)
    studio.models.get(args.model)  # load before serving: the first page finds the model ready
    launch(studio, host=args.host, port=args.port)

