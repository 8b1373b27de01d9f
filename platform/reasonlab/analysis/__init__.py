"""Analyses of trained models and finished runs: capacity bits, plots. No Ray or MLflow here."""
