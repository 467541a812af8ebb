"""Evaluation: the refusal judge, one harness for any intervention (held-out refusal, over-refusal, perplexity,
multiple choice), fast refusal proxies, the baselines and the threshold sweep. Uses the method layer; knows
nothing of run folders or the UI."""
