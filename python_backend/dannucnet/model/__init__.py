"""DAN-NucNet network, loss, and weights with their model card."""

from dannucnet.model.card import ModelCard
from dannucnet.model.loss import LOSSES, bce_loss, dan_nucnet_loss
from dannucnet.model.network import DANNucNet, ModelConfig, count_parameters
from dannucnet.model.registry import DEFAULT_MODEL, available_models, load_model
from dannucnet.model.weights import LoadedModel, save_model, untrained_model

__all__ = [
    "DEFAULT_MODEL",
    "LOSSES",
    "DANNucNet",
    "LoadedModel",
    "ModelCard",
    "ModelConfig",
    "available_models",
    "bce_loss",
    "count_parameters",
    "dan_nucnet_loss",
    "load_model",
    "save_model",
    "untrained_model",
]
