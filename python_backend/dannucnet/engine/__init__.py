"""Inference engine: device choice, sliding windows with blending, resampling to the model's pixel size."""

from dannucnet.engine.device import choose_device
from dannucnet.engine.predictor import Predictor
from dannucnet.engine.resample import resample_rgb, scale_to_model

__all__ = ["Predictor", "choose_device", "resample_rgb", "scale_to_model"]
