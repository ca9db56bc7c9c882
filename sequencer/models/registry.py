"""The model table: every architecture of the paper and its reference code, as data.

A row names its parent and says only how it differs. ``list_models``, ``create_model``, the ``sequencer
models`` command, the README's model table and the tests are all derived from ``MODELS``.

``create_model`` builds the plain PyTorch model and follows timm's model contract: ``pretrained_cfg`` /
``default_cfg`` as timm declares them, and ``features_only`` backbones through timm's own feature
wrappers (``feature_cls`` 'getter', 'fx', 'hook', 'dict' or 'list'). The fast engine is applied
elsewhere (``sequencer.create_model``); this module knows nothing of it.
"""
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureListNet, PretrainedCfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet
from torch import nn

from ..errors import UserError
from .sequencer import Sequencer2D, VanillaSequencer

RELEASE_URL = 'https://github.com/okojoalg/sequencer/releases/download/weights/{}.pth'
NUM_STAGES = 4

# timm's feature wrappers by the names timm's builder accepts for ``feature_cls``
FEATURE_CLASSES = {'getter': FeatureGetterNet, 'fx': FeatureGraphNet, 'hook': FeatureHookNet,
                   'dict': FeatureDictNet, 'list': FeatureListNet}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: type
    args: Dict
    params_m: float                     # parameter count (millions) reported for the architecture
    description: str
    top1: Optional[float] = None        # ImageNet-1K top-1 reported in the paper
    weights: Tuple[str, ...] = ()       # published weight sources, tried in order
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875

    @property
    def pool_size(self) -> Tuple[int, int]:
        """The final feature map (H, W) at ``input_size``: every stage's patch / downsample convolution has
        kernel = stride and no padding, so each divides the grid, rounding down."""
        h, w = self.input_size[1:]
        for p in self.args['patch_sizes']:
            h, w = h // p, w // p
        return h, w

    @property
    def pretrained_cfg(self) -> Dict:
        """timm's pretrained config (``timm.models.PretrainedCfg`` fields) of the model and its weights."""
        return PretrainedCfg(
            architecture=self.name, url=next((w for w in self.weights if w.startswith('http')), ''),
            hf_hub_id=next((w[len('hf-hub:'):] for w in self.weights if w.startswith('hf-hub:')), None),
            num_classes=1000, input_size=self.input_size, pool_size=self.pool_size, crop_pct=self.crop_pct,
            interpolation='bicubic', crop_mode='center', fixed_input_size=False,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.proj', classifier='head.fc',
            license='apache-2.0', origin_url='https://github.com/okojoalg/sequencer',
            paper_name='Sequencer: Deep LSTM for Image Classification', paper_ids='arXiv:2205.01972',
        ).to_dict()


def _published(name: str) -> Tuple[str, ...]:
    return RELEASE_URL.format(name), f'hf-hub:timm/{name}.in1k'


_S = dict(layers=(4, 3, 8, 3), patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384),
          hidden_sizes=(48, 96, 96, 96), mlp_ratios=(3.0, 3.0, 3.0, 3.0))
_V = dict(layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384, 384, 384, 384),
          hidden_sizes=(192, 192, 192, 192), mlp_ratios=(3.0, 3.0, 3.0, 3.0))
_H2X = dict(hidden_sizes=(96, 192, 192, 192))
_392 = dict(input_size=(3, 392, 392), crop_pct=1.0)

# name, parent, params (M), description, changes to the parent's constructor args, other fields
_TABLE = [
    ('sequencer2d_s', None, 27.65, 'Sequencer2D-S', _S, dict(top1=82.3, weights=_published('sequencer2d_s'))),
    ('sequencer2d_m', 'sequencer2d_s', 38.31, 'Sequencer2D-M', dict(layers=(4, 3, 14, 3)),
     dict(top1=82.8, weights=_published('sequencer2d_m'))),
    ('sequencer2d_l', 'sequencer2d_s', 54.30, 'Sequencer2D-L', dict(layers=(8, 8, 16, 4)),
     dict(top1=83.4, weights=_published('sequencer2d_l'))),
    ('sequencer2d_s_392', 'sequencer2d_s', 27.65, 'Sequencer2D-S at 392 px (224 px weights)', {},
     dict(_392, weights=_published('sequencer2d_s'))),
    ('sequencer2d_m_392', 'sequencer2d_m', 38.31, 'Sequencer2D-M at 392 px (224 px weights)', {},
     dict(_392, weights=_published('sequencer2d_m'))),
    ('sequencer2d_l_392', 'sequencer2d_l', 54.30, 'Sequencer2D-L at 392 px (224 px weights; paper: 84.6 fine-tuned)',
     {}, dict(_392, weights=_published('sequencer2d_l'))),
    ('sequencer2d_s_unidirectional', 'sequencer2d_s', 20.99, 'ablation: forward-only LSTMs',
     dict(bidirectional=False), {}),
    ('sequencer2d_s_add', 'sequencer2d_s', 26.55, 'ablation: vertical + horizontal summed, not concatenated',
     dict(union='add'), {}),
    ('sequencer2d_s_h2x', 'sequencer2d_s', 45.40, 'ablation: hidden sizes doubled', _H2X, {}),
    ('sequencer2d_s_without_fc', 'sequencer2d_s', 25.43, 'ablation: no fusing Linear after BiLSTM2D',
     dict(with_fc=False), {}),
    ('sequencer2d_vertical', 'sequencer2d_s', 27.65, 'ablation: vertical BiLSTM only (hidden doubled, no fc)',
     dict(_H2X, union='vertical', with_fc=False), {}),
    ('sequencer2d_s_horizontal', 'sequencer2d_s', 27.65, 'ablation: horizontal BiLSTM only (hidden doubled, no fc)',
     dict(_H2X, union='horizontal', with_fc=False), {}),
    ('gru_sequencer2d_s', 'sequencer2d_s', 24.87, 'option: GRU instead of LSTM', dict(rnn_layer='gru'), {}),
    ('rnn_sequencer2d_s', 'sequencer2d_s', 19.32, 'option: tanh RNN instead of LSTM', dict(rnn_layer='rnn'), {}),
    ('sequencer2d_l_d4_3x', 'sequencer2d_l', 96.25, 'option: Sequencer2D-L with widths 256/512, hidden 64/128',
     dict(embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128)), {}),
    ('v_sequencer_s', None, 33.02, 'vanilla Sequencer: one BiLSTM over all tokens, 14 px patches', _V, {}),
    ('v_sequencer_s_h', 'v_sequencer_s', 27.65, 'vanilla Sequencer, hierarchical widths as Sequencer2D-S',
     dict(patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384), hidden_sizes=(96, 192, 192, 192)), {}),
    ('v_sequencer_s_pe', 'v_sequencer_s', 33.11, 'vanilla Sequencer with an absolute position embedding',
     dict(ape=True), {}),
]


def _build_table() -> Dict[str, ModelSpec]:
    specs: Dict[str, ModelSpec] = {}
    for name, parent, params, desc, changes, extra in _TABLE:
        if parent is None:
            family, args = (VanillaSequencer if name.startswith('v_') else Sequencer2D), dict(changes)
        else:
            family, args = specs[parent].family, {**specs[parent].args, **changes}
        specs[name] = ModelSpec(name=name, family=family, args=args, params_m=params, description=desc, **extra)
    return specs


MODELS: Dict[str, ModelSpec] = _build_table()


class UnknownModelError(UserError):
    pass


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `sequencer models`"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return MODELS[name]


def list_models(pattern: str = '*', pretrained: bool = False) -> List[str]:
    """Model names matching a glob ``pattern``; ``pretrained=True`` keeps those with published weights."""
    return [n for n, s in MODELS.items() if fnmatch.fnmatch(n, pattern) and (s.weights or not pretrained)]



def create_model(
        name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        num_classes: Optional[int] = None,
        features_only: bool = False,
        out_indices: Optional[Union[int, Sequence[int]]] = None,
        feature_cls: Optional[Union[str, type]] = None,
        feature_cfg: Optional[Dict] = None,
        **overrides,
) -> nn.Module:
    """Build the plain model ``name`` from the table, as timm's ``create_model`` builds one of its own
    (``sequencer.create_model`` also applies the fast engine).

    Args:
        name: a name from ``list_models()``.
        pretrained: load the published ImageNet-1K weights (reference release first, timm's hub copy second);
            with another ``num_classes`` the head is left freshly initialised.
        checkpoint_path: a local path, URL or ``hf-hub:`` id in any supported layout, loaded strictly.
        num_classes: classifier width (default 1000; 0 gives a model without head). With
            ``global_pool=''`` as well, the model returns its unpooled NHWC features.
        features_only: return a backbone giving the feature maps of the ``out_indices`` stages (all four by
            default) in a list, wrapped by one of timm's feature classes (see ``wrap_features``).
        out_indices: stage indices (0-3, negative counting from the end), or n for the last n stages.
        feature_cls: 'getter' (default: ``forward_intermediates``, NCHW maps), 'fx' (a traced graph), 'hook'
            (forward hooks), 'dict' / 'list' (the stages re-run as a chain); the last three give the stages'
            native NHWC maps and say so in ``output_fmt``, as timm's wrappers do.
        feature_cfg: more arguments of the feature class (``norm``, ``output_fmt``, ``return_dict``,
            ``out_map``, ...); it may also hold ``feature_cls`` and ``out_indices``.
        **overrides: any constructor argument of the family (drop_path_rate, global_pool, in_chans, img_size, ...).
    """
    from .weights import load_checkpoint, load_pretrained  # weights does I/O; import on use
    spec = get_spec(name)
    if not features_only and (out_indices is not None or feature_cls is not None or feature_cfg):
        raise UserError(f"{name}: out_indices, feature_cls and feature_cfg apply to a features_only model; "
                         "pass features_only=True")
    args = {**spec.args, **overrides}
    if num_classes is not None:
        args['num_classes'] = num_classes
    if spec.family is VanillaSequencer:
        args.setdefault('img_size', spec.input_size[-1])
    model = spec.family(**args)
    model.pretrained_cfg = spec.pretrained_cfg
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        load_pretrained(model, spec)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    if features_only:
        model = wrap_features(model, out_indices=out_indices, feature_cls=feature_cls, feature_cfg=feature_cfg)
    return model


def _stage_indices(out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """Stage indices as non-negative ints; an int n means the last n stages."""
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= NUM_STAGES:
            raise UserError(f"out_indices={out_indices} (the last n stages) must be 1 to {NUM_STAGES}")
        return tuple(range(NUM_STAGES - out_indices, NUM_STAGES))
    indices = tuple(out_indices)
    bad = [i for i in indices if not isinstance(i, int) or not -NUM_STAGES <= i < NUM_STAGES]
    if not indices or bad or len({i % NUM_STAGES for i in indices}) != len(indices):
        raise UserError(f"out_indices {indices} must be distinct stage indices in {-NUM_STAGES}..{NUM_STAGES - 1}")
    return tuple(i % NUM_STAGES for i in indices)


def wrap_features(
        model: nn.Module,
        out_indices: Optional[Union[int, Sequence[int]]] = None,
        feature_cls: Optional[Union[str, type]] = None,
        feature_cfg: Optional[Dict] = None,
) -> nn.Module:
    """``model`` as a features-only backbone, wrapped as timm's ``build_model_with_cfg`` wraps its models.

    ``feature_cls`` (or ``feature_cfg['feature_cls']``) names one of ``FEATURE_CLASSES`` or is a class
    taking timm's arguments; 'getter' by default. ``out_indices`` (or ``feature_cfg['out_indices']``) default
    to all four stages. The wrapper's ``pretrained_cfg`` / ``default_cfg`` drop the classifier fields.
    """
    cfg = dict(feature_cfg or {})
    cls = feature_cls if feature_cls is not None else cfg.pop('feature_cls', 'getter')
    cfg.pop('feature_cls', None)
    if isinstance(cls, str):
        if cls.lower() not in FEATURE_CLASSES:
            raise UserError(f"feature_cls must be one of {', '.join(map(repr, FEATURE_CLASSES))} "
                             f"(or a timm feature class), got {cls!r}")
        cls = FEATURE_CLASSES[cls.lower()]
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"feature_cls must be a name or an nn.Module class, got {cls!r}")
    indices = out_indices if out_indices is not None else cfg.pop('out_indices', tuple(range(NUM_STAGES)))
    cfg.pop('out_indices', None)
    cfg['out_indices'] = _stage_indices(indices)
    if issubclass(cls, (FeatureDictNet, FeatureListNet)):
        # these re-run the model's children in order: they miss what its forward does between them
        if any(getattr(model, a, None) is not None for a in ('absolute_pos_embed', 'shuffle_patches')):
            raise UserError(f"feature_cls={cls.__name__} re-runs the model's modules as a chain and would skip "
                             "its position embedding / patch shuffle; use 'getter', 'fx' or 'hook'")
        cfg.setdefault('flatten_sequential', True)  # stages.N are one Sequential deep
    if not issubclass(cls, (FeatureDictNet, FeatureHookNet)):
        cfg.pop('flatten_sequential', None)
    if not issubclass(cls, FeatureHookNet):
        cfg.pop('no_rewrite', None)
    if not issubclass(cls, FeatureGetterNet):
        # the wrappers other than the getter return the stage outputs as they are: NHWC, and say so
        cfg.setdefault('output_fmt', getattr(model, 'output_fmt', 'NCHW'))
    pretrained_cfg = getattr(model, 'pretrained_cfg', None)
    in_chans = getattr(model, 'in_chans', None)
    features = cls(model, **cfg)
    if in_chans is not None:
        features.in_chans = in_chans
    if pretrained_cfg is not None:
        features.pretrained_cfg = pretrained_cfg_for_features(pretrained_cfg)
        features.default_cfg = features.pretrained_cfg
    return features
