"""NeuronTune Studio engine: find, score, modulate and export the MLP neurons behind refusal."""
from .modulation import Modulation, fold_into_weights, modulate
from .models import LoadedModel, load_model

__all__ = ["Modulation", "modulate", "fold_into_weights", "LoadedModel", "load_model"]
__version__ = "0.1.0"
