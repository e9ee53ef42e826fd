from catkit.models.config import ModelConfig
from catkit.models.model import CatModel, ModelOutput

__all__ = ["ModelConfig", "CatModel", "ModelOutput"]
