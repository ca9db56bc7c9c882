"""torch.hub entry points: every model of ``sequencer.list_models()``.

    model = torch.hub.load('path/to/sequencer', 'sequencer2d_s', source='local', pretrained=True)
    model = torch.hub.load('path/to/sequencer', 'sequencer2d_s', source='local', num_classes=10)
    backbone = torch.hub.load('path/to/sequencer', 'sequencer2d_s', source='local', features_only=True)

Each entry point takes ``sequencer.create_model``'s arguments: ``pretrained`` (the published ImageNet-1K
weights, for the models that have them), ``checkpoint_path``, ``num_classes``, ``rnn_engine``, timm's
``features_only`` / ``out_indices`` / ``feature_cls`` / ``feature_cfg``, and any constructor argument of the
model's family (``drop_path_rate``, ``global_pool``, ...).
"""
dependencies = ['torch', 'torchvision', 'timm', 'safetensors']

from sequencer import create_model as _create_model  # noqa: E402
from sequencer import list_models as _list_models  # noqa: E402
from sequencer.models import get_spec as _get_spec  # noqa: E402


def _entry_point(name: str):
    spec = _get_spec(name)

    def entry(pretrained: bool = False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    weights = 'published ImageNet-1K weights with pretrained=True' if spec.weights else 'no published weights'
    entry.__doc__ = (f"{spec.description} ({spec.params_m:.2f} M parameters, {spec.input_size[-1]} px; {weights}).\n\n"
                     f"Arguments are those of sequencer.create_model('{name}', ...).")
    return entry


for _name in _list_models():
    globals()[_name] = _entry_point(_name)
del _name
