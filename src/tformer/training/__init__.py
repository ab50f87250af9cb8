"""Training on Hugging Face Accelerate: configuration, schedule, checkpoints and the loop."""

from tformer.training.checkpoint import CheckpointError, TrainState, latest_checkpoint
from tformer.training.config import Config, ConfigError, load_config
from tformer.training.loop import TrainingError, TrainResult, train
from tformer.training.rundir import RunDirError

__all__ = [
    "CheckpointError", "Config", "ConfigError", "TrainResult", "TrainState", "TrainingError",
    "RunDirError", "latest_checkpoint", "load_config", "train",
]
