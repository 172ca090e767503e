"""Pretraining: optimizer, train state, compiled steps and the run loop.

`python -m jaxllm.train` is the command-line entry point (see `jaxllm/train/__main__.py`).
"""

from jaxllm.metrics import MetricsLog, plot_losses
from jaxllm.train.loop import ProgressHooks, RunInfo, RunResult, evaluate, pretrain
from jaxllm.train.run_dir import RunDirError, check_run_dir, first_config_difference
from jaxllm.train.optim import make_optimizer, make_schedule, weight_decay_mask
from jaxllm.train.state import TrainState, abstract_train_state, create_train_state
from jaxllm.train.step import make_eval_step, make_train_step

__all__ = [
    "MetricsLog",
    "ProgressHooks",
    "RunDirError",
    "RunInfo",
    "RunResult",
    "TrainState",
    "abstract_train_state",
    "check_run_dir",
    "create_train_state",
    "evaluate",
    "first_config_difference",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "plot_losses",
    "pretrain",
    "weight_decay_mask",
]
