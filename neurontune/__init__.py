"""NeuronTune Studio engine: find, score, modulate and export the MLP neurons behind refusal."""
from .interventions.modulation import Modulation, fold_into_weights, modulate
from .model.loading import LoadedModel, load_model
from .run.folder import RunFolder

__all__ = ["Modulation", "modulate", "fold_into_weights", "LoadedModel", "load_model", "RunFolder"]
__version__ = "0.1.0"
