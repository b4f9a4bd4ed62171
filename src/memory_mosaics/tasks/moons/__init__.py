"""Three moons: the paper's toy for predictive disentanglement (data, model, training, analysis, plots)."""
