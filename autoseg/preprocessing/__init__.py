"""Preprocessing: crop, resample and normalise training cases, and the exact inverse for predictions."""
