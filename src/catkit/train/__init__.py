from catkit.train.config import PRESETS, TrainConfig, preset
from catkit.train.trainer import Trainer, TrainResult, lr_at

__all__ = ["PRESETS", "TrainConfig", "preset", "Trainer", "TrainResult", "lr_at"]
