"""Sequencer: Deep LSTM for Image Classification (Tatsunami & Taki, NeurIPS 2022) in PyTorch."""
__version__ = '0.1.0'

from .analysis import count_flops, count_params
from .factory import create_model
from .fast import set_engine
from .models import (
           MODELS,
           CheckpointError,
           Sequencer2D,
           UnknownModelError,
           VanillaSequencer,
           list_models,
           load_checkpoint,
)

__all__ = ['MODELS', 'CheckpointError', 'Sequencer2D', 'UnknownModelError', 'VanillaSequencer', 'create_model',
           'list_models', 'load_checkpoint', 'set_engine', 'count_flops', 'count_params', '__version__']
