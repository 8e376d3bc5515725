"""Inference: sliding-window prediction, postprocessing, ensembles and the choice of configuration."""
