"""NeuronTune Studio: the Gradio app over the engine (the engine never imports this package)."""
from .app import build_app, launch
from .state import Session, Studio

__all__ = ["Studio", "Session", "build_app", "launch"]
