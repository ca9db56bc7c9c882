"""Sequencer2D / VanillaSequencer, the model table and weight loading."""
from .registry import MODELS, ModelSpec, UnknownModelError, create_model, get_spec, list_models
from .sequencer import Sequencer2D, VanillaSequencer
from .weights import CheckpointError, load_checkpoint

__all__ = ['MODELS', 'ModelSpec', 'UnknownModelError', 'create_model', 'get_spec', 'list_models', 'Sequencer2D',
           'VanillaSequencer', 'CheckpointError', 'load_checkpoint']
