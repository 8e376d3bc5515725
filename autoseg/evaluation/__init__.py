"""Evaluation: metrics, lesion matching, folder evaluation and the clinical-style report."""
