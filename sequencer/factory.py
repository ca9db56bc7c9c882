"""``create_model``: a model of the table, built plain, then put on the requested engine."""
from typing import Optional

from timm.layers import is_exportable, is_scriptable
from torch import nn

from . import models
from .fast import set_engine


def create_model(name: str, pretrained: bool = False, *, rnn_engine: Optional[str] = 'auto', **kwargs) -> nn.Module:
    """Build ``name`` (see ``sequencer.models.create_model`` for the arguments) and apply ``rnn_engine``:

    * 'auto' (default): the fast modules, each BiLSTM2D choosing its recurrence per call (``sequencer.fast``);
    * 'fused': the fast modules, the fused recurrence always;
    * 'native': the paper's model in plain PyTorch (``nn.LSTM``, timm's layers), as ``sequencer.models`` builds it.

    Inside timm's ``set_layer_config(scriptable=True)`` or ``exportable=True``, 'auto' gives the plain model.
    The parameters and state_dict keys are the same whatever the engine; ``sequencer.fast.set_engine`` changes it
    later.
    """
    model = models.create_model(name, pretrained=pretrained, **kwargs)
    engine = rnn_engine or 'auto'
    if engine == 'auto' and (is_scriptable() or is_exportable()):
        engine = 'native'
    return set_engine(model, engine)
