"""A finished run's model, rebuilt from its own files: `config.yaml` (the resolved job it was trained
with) and `model/` (what its method saved, with the tokenizer). No MLflow here: the orchestration
downloads those two into a folder (tracking.download_run) and this rebuilds task, method, tokenizer and
model from it, with the run's own method, so a composite model (an ICoT-KD student with its readers)
loads the way it was saved.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from reasonlab.config import Config, config_from_dict
from reasonlab.methods import Method, make_method
from reasonlab.tasks import make_task
from reasonlab.tokenizer import load_tokenizer

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"


@dataclass
class LoadedRun:
    cfg: Config
    task: object
    method: Method
    tokenizer: object
    model: torch.nn.Module


def read_run_config(path: str | Path) -> Config:
    """A run's resolved job, from its `config.yaml`."""
    data = yaml.safe_load(Path(path).read_text())
    return config_from_dict(data, job=data.get("job", "job"))


def load_run_dir(directory: str | Path, device: torch.device) -> LoadedRun:
    """The run whose `config.yaml` and `model/` are in `directory`, its model on `device` in eval mode."""
    directory = Path(directory)
    cfg = read_run_config(directory / CONFIG_FILE)
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    tokenizer = load_tokenizer(str(directory / MODEL_DIR))
    method.setup(task, tokenizer)
    model_cfg = dataclasses.replace(cfg.model, pretrained=str(directory / MODEL_DIR), n_params=None)
    model = method.build_model(model_cfg, tokenizer, 0, device)  # a saved model has its own position table
    return LoadedRun(cfg, task, method, tokenizer, model.eval())
