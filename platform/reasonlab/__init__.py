"""reasonlab: experiments on how transformers reason, on Ray.

The core (tasks, tokenizer, models, methods, evaluate, analysis) imports neither ray nor mlflow; the
orchestration (data, train, sweep, tracking, cli) wires it into Ray and MLflow.
"""
__version__ = "0.1.0"
