"""Interventions on a loaded model, always scoped to a `with` block and to the calling thread: forward hooks,
per-neuron gains (`modulation`), the input gate that scales them per prompt (`gating`) and batched generation
with per-row gains (`generation`)."""
