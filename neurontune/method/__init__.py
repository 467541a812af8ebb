"""The NeuronTune method: attribution of every MLP neuron (`attribution`, `neuron_scores`), selection by
neuron counts (`selection`) and meta-learned gains (`metalearn`). Uses the model and interventions layers;
knows nothing of evaluation, run folders or the UI."""
