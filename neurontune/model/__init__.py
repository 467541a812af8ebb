"""Models: loading any supported causal LM (with checks before its weights are read), where its MLP neurons
are (`neuron_map`), tiny random models for tests, its context length and teacher-forced log-probabilities."""
