"""Command-line arguments of ``train`` and ``validate``: timm's train.py / validate.py flags, same names and
meanings, so the reference README's command lines run verbatim. ``-c FILE.yaml`` sets defaults from a
recipe; flags given on the command line win."""
import argparse
import ast
import difflib
import math
import shlex
from typing import List, Optional, Tuple

import yaml

from ..errors import UserError, first_line


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: MESSAGE (see PROG --help)``, exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default said once: appended where the help text does not already say
    it (``default`` in the text), left out where there is none to show (None, '', False, an empty list: the
    option is off or unset, and the text says what happens then)."""

    def _get_help_string(self, action):
        text = action.help or ''
        default = action.default
        if ('default' in text or default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, (str, list, tuple, dict)) and not default)):
            return text
        return super()._get_help_string(action)


class Range:
    """An argparse ``type``: a number of ``kind`` in [low, high] (None: unbounded; ``open_low`` / ``open_high``
    exclude the bound). A value outside ends with argparse's one line naming the flag, exit 2; ``check_recipe`` does
    the same for values that came from a recipe."""

    def __init__(self, kind, low=None, high=None, open_low=False, open_high=False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high

    def describe(self) -> str:
        word = 'an integer' if self.kind is int else 'a number'
        lo = None if self.low is None else f"{'above' if self.open_low else 'at least'} {self.low}"
        hi = None if self.high is None else f"{'below' if self.open_high else 'at most'} {self.high}"
        return f"{word} {' and '.join(b for b in (lo, hi) if b)}".strip()

    def __call__(self, text):
        try:
            value = self.kind(text) if not isinstance(text, bool) else None
            if value is None or not math.isfinite(value) or (self.kind is int and isinstance(text, float)
                                                               and text != value):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if ((self.low is not None and (value < self.low or (self.open_low and value == self.low))) or
                (self.high is not None and (value > self.high or (self.open_high and value == self.high)))):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value

    def __repr__(self):  # argparse names the type in some messages
        return self.describe()


COUNT, NATURAL = Range(int, 1), Range(int, 0)   # sizes, batches, epochs; processes, epochs that may be 0
PROB, RATE = Range(float, 0, 1), Range(float, 0, 1, open_high=True)   # probabilities; rates below 1
NONNEG, POSITIVE = Range(float, 0), Range(float, 0, open_low=True)
FINITE = Range(float)   # any finite number (not nan / inf)
POOL_TYPES = ['avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax',
              'fastcatavgmax']   # timm's SelectAdaptivePool2d types that end in a pooled vector
INTERPOLATIONS = ['nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos']   # timm's names


def check_recipe(parser: argparse.ArgumentParser, cfg: dict, source: str) -> dict:
    """A recipe's values as the command line would give them, from the parser's actions: a flag takes true or
    false; --model-kwargs KEY=VALUE text (split as a shell would), a list of it or a mapping; an option of several
    values one value or a list; each value a number of the option's type and range, or a string (a number becomes its
    text), within its choices; null only where the default is null. Anything else is one line naming the recipe
    and the option."""
    actions = {a.dest: a for a in parser._actions if a.default is not argparse.SUPPRESS}
    unknown = sorted(str(key) for key in cfg if key not in actions)
    if unknown:
        close = [m for key in unknown for m in difflib.get_close_matches(key.replace('-', '_'), actions, 1)]
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}"
                        + (f" (did you mean {', '.join(close)}?)" if close else ''))
    values = {}
    for key, value in cfg.items():
        action = actions[key]
        try:
            values[key] = _recipe_value(action, value)
        except argparse.ArgumentTypeError as e:
            flag = '--' + key.replace('_', '-')
            if flag not in action.option_strings:
                flag = max(action.option_strings, key=len) if action.option_strings else key
            raise UserError(f"{source}: {flag} {e}") from None
    return values


def _recipe_value(action: argparse.Action, value):
    if value is None and action.default is None:
        return None
    if action.nargs == 0:   # store_true, store_false, BooleanOptionalAction
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value
    if isinstance(action, ParseKwargs):
        if value is None:   # an empty `model_kwargs:` entry: no extra arguments
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        try:
            tokens = shlex.split(value) if isinstance(value, str) else value
        except ValueError as e:   # an unclosed quote
            raise argparse.ArgumentTypeError(f"{str(e).lower()} in {value!r}") from None
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise argparse.ArgumentTypeError(f"must be KEY=VALUE text, a list of it or a mapping, got {value!r}")
        return parse_kwargs(tokens)
    if action.nargs == '?' and action.const is not None and isinstance(value, bool):
        return action.const if value else action.default   # `--torchcompile: true` is the bare flag
    many = action.nargs not in (None, '?')
    convert = Range(action.type) if action.type in (int, float) else action.type
    out = []
    for v in (value if many and isinstance(value, list) else [value]):
        if isinstance(convert, Range):
            v = convert(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        elif not isinstance(v, str):
            raise argparse.ArgumentTypeError(f"must be a string, got {v!r}")
        if action.choices is not None and v not in action.choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(repr, action.choices))}, got {v!r}")
        out.append(v)
    if isinstance(action.nargs, int) and len(out) != action.nargs:
        raise argparse.ArgumentTypeError(f"takes {action.nargs} values, got {len(out)}")
    if action.nargs == '+' and not out:
        raise argparse.ArgumentTypeError("takes at least 1 value, got none")
    return out if many else out[0]


def parse_kwargs(pairs: List[str]) -> dict:
    """``['layers=(1,1,2,1)', 'union=add']`` -> dict, values parsed as Python literals when possible."""
    kw = {}
    for pair in pairs:
        if '=' not in pair:
            raise argparse.ArgumentTypeError(f"expected key=value, got {pair!r}")
        key, raw = pair.split('=', 1)
        try:
            kw[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kw[key] = raw
    return kw


class ParseKwargs(argparse.Action):
    """``--model-kwargs layers='(1,1,2,1)' union=add`` -> dict (values parsed as Python literals when possible)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **parse_kwargs(values)})
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _data_args(parser, training: bool):
    g = parser.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageFolder layout: train/ and val/ with '
                   'one folder per class)')
    g.add_argument('--data-dir', default=None, help='dataset root (alternative to the positional DIR)')
    g.add_argument('--dataset', '-d', default='', help="dataset type: '' for a folder, torch/cifar10, "
                   "torch/cifar100, flowers102, stanford_cars, or another indexed type timm's create_dataset knows "
                   "(hfds/...; not the streamed tfds/, wds/, hfids/)")
    if training:
        g.add_argument('--train-split', default='train', help="training split: the folder of that name (or a "
                       "synonym) in DIR; '.' for DIR itself")
        g.add_argument('--val-split', default='validation', help="validation split; 'validation' finds val/, '.' "
                       "is DIR itself")
    else:
        g.add_argument('--split', default='validation', help="split to evaluate ('validation' finds val/; DIR "
                       "itself where it has no split folders)")
    g.add_argument('--dataset-download', action='store_true', help='download torch/* datasets if missing')
    g.add_argument('--class-map', default='', help='file mapping class folder names to indices')
    g.add_argument('-j', '--workers', type=NATURAL, default=4, help='data loading processes')


def _model_args(parser, training: bool):
    g = parser.add_argument_group('Model')
    g.add_argument('--model', default='sequencer2d_s', help='model name (see `sequencer models`)')
    if training:
        g.add_argument('--pretrained', action='store_true', help='start from the published ImageNet-1K weights')
        g.add_argument('--pretrained-path', default=None, help='load pretrained weights from this file instead '
                       '(head replaced when --num-classes differs)')
    else:
        g.add_argument('--pretrained', action='store_true',
                       help="evaluate the published ImageNet-1K weights; without --checkpoint / --pretrained-path "
                            "they are evaluated anyway, as timm's validate.py does, with a note saying so")
        g.add_argument('--pretrained-path', default=None, help='the same as --checkpoint; give one of the two')
    g.add_argument('--num-classes', type=COUNT, default=None, help='classes of the head (default: the dataset\'s)')
    g.add_argument('--gp', default=None, choices=POOL_TYPES, help="global pool type (default: the model's, avg)")
    g.add_argument('--img-size', type=COUNT, default=None, help='image size (default: the model\'s)')
    g.add_argument('--in-chans', type=COUNT, default=None, help='image channels: 3 (RGB) or 1 (grayscale) '
                   '(default: 3)')
    g.add_argument('--input-size', default=None, nargs=3, type=COUNT, metavar='N',
                   help='input dimensions C H W, e.g. 3 392 392 (default: the model\'s)')
    g.add_argument('--crop-pct', default=None, type=POSITIVE, help="evaluation crop fraction (default: the "
                   "model's)")
    g.add_argument('--mean', type=FINITE, nargs='+', default=None, help="mean pixel value (default: the model's)")
    g.add_argument('--std', type=POSITIVE, nargs='+', default=None, help="pixel std (default: the model's)")
    g.add_argument('--interpolation', default='', choices=['', *INTERPOLATIONS],
                   help='resize interpolation (default: the model\'s)')
    g.add_argument('-b', '--batch-size', type=COUNT, default=128 if training else 256,
                   help='batch size per process' + (' (on the CPU, refused before training where a step would '
                                                    'not fit in memory)' if training else ''))
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra model arguments, e.g. layers="(1,1,2,1)" hidden_sizes="(8,16,16,16)"')
    g.add_argument('--rnn-engine', default=None, choices=['auto', 'native', 'fused'],
                   help='how the recurrences run (default: auto)')
    g.add_argument('--amp', '--native-amp', dest='amp', action='store_true',
                   help='mixed precision with torch.amp (fp16 with loss scaling on GPU; bf16 autocast on CPU)')
    g.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'],
                   help='autocast dtype (default: float16 on GPU, bfloat16 on CPU)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None,
                   help='compile the model with torch.compile (the backend named, inductor if none)')
    g.add_argument('--torchcompile-mode', default=None,
                   help="torch.compile mode ('default', 'reduce-overhead': CUDA graphs, 'max-autotune', ...); "
                        "implies --torchcompile")
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--log-interval', type=COUNT, default=50, help='batches between log lines')


def build_train_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog='sequencer train', description='Train or fine-tune a Sequencer model (timm train.py flags).',
        formatter_class=HelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML recipe setting default values')
    _data_args(parser, training=True)
    _model_args(parser, training=True)
    g = parser.add_argument_group('Initialisation and resuming')
    g.add_argument('--initial-checkpoint', default='', help='load these weights (any supported layout) first')
    g.add_argument('--resume', default='', help="resume a run from this checkpoint ('auto': the newest valid "
                   "checkpoint of the output folder)")
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore optimizer state when resuming')
    g.add_argument('--start-epoch', type=NATURAL, default=None, help='override the starting epoch')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute blocks in backward (less memory)')
    g.add_argument('--grad-accum-steps', type=COUNT, default=1, help='batches accumulated per optimizer step')
    g.add_argument('-vb', '--validation-batch-size', type=COUNT, default=None, help='eval batch size')
    g = parser.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', help='optimizer (timm name: adamw, sgd, lamb, ...)')
    g.add_argument('--opt-eps', type=NONNEG, default=None)
    g.add_argument('--opt-betas', type=RATE, nargs='+', default=None)
    g.add_argument('--momentum', type=NONNEG, default=0.9)
    g.add_argument('--weight-decay', type=NONNEG, default=2e-5)
    g.add_argument('--clip-grad', type=POSITIVE, default=None, help='gradient clipping value (off by default)')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'])
    g.add_argument('--layer-decay', type=POSITIVE, default=None, help='layer-wise learning rate decay')
    g = parser.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine', help='scheduler (timm name: cosine, step, plateau, ...)')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule every optimizer update')
    g.add_argument('--lr', type=NONNEG, default=None, help='learning rate (default: lr-base scaled by batch)')
    g.add_argument('--lr-base', type=NONNEG, default=0.1, help='lr for a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=COUNT, default=256)
    g.add_argument('--lr-base-scale', default='', choices=['', 'linear', 'sqrt'],
                   help="lr scaling with batch size (default: sqrt for adam-like, linear otherwise)")
    g.add_argument('--lr-noise', type=NONNEG, nargs='+', default=None)
    g.add_argument('--lr-noise-pct', type=NONNEG, default=0.67)
    g.add_argument('--lr-noise-std', type=NONNEG, default=1.0)
    g.add_argument('--lr-cycle-mul', type=POSITIVE, default=1.0)
    g.add_argument('--lr-cycle-decay', type=NONNEG, default=0.5)
    g.add_argument('--lr-cycle-limit', type=COUNT, default=1)
    g.add_argument('--lr-k-decay', type=FINITE, default=1.0)
    g.add_argument('--warmup-lr', type=NONNEG, default=1e-5)
    g.add_argument('--min-lr', type=NONNEG, default=0)
    g.add_argument('--epochs', type=COUNT, default=300)
    g.add_argument('--epoch-repeats', type=NONNEG, default=0.,
                   help='passes over the training images per epoch, each with its own augmentation (0: one)')
    g.add_argument('--decay-milestones', type=NATURAL, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-epochs', type=POSITIVE, default=90)
    g.add_argument('--warmup-epochs', type=NATURAL, default=5)
    g.add_argument('--warmup-prefix', action='store_true')
    g.add_argument('--cooldown-epochs', type=NATURAL, default=0)
    g.add_argument('--patience-epochs', type=NATURAL, default=10)
    g.add_argument('--decay-rate', '--dr', type=NONNEG, default=0.1)
    g = parser.add_argument_group('Augmentation and regularisation')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation at all')
    g.add_argument('--scale', type=Range(float, 0, 1, open_low=True), nargs=2, default=[0.08, 1.0],
                   help='random-resized-crop scale')
    g.add_argument('--ratio', type=POSITIVE, nargs=2, default=[3. / 4., 4. / 3.], help='random-resized-crop ratio')
    g.add_argument('--hflip', type=PROB, default=0.5)
    g.add_argument('--vflip', type=PROB, default=0.)
    g.add_argument('--color-jitter', type=NONNEG, default=0.4)
    g.add_argument('--aa', default=None, help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument('--aug-repeats', type=NONNEG, default=0,
                   help="repeated augmentation: each image of an epoch this many times, the copies spread over the "
                   "processes, each augmented in its own way (timm's RepeatAugSampler; 0: off)")
    g.add_argument('--reprob', type=PROB, default=0., help='random erasing probability')
    g.add_argument('--remode', default='pixel', choices=['const', 'rand', 'pixel'], help='random erasing mode')
    g.add_argument('--recount', type=COUNT, default=1)
    g.add_argument('--resplit', action='store_true',
                   help='random erasing leaves the first half of each batch clean (needs --reprob)')
    g.add_argument('--mixup', type=NONNEG, default=0.0, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=NONNEG, default=0.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=PROB, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=PROB, default=1.0)
    g.add_argument('--mixup-switch-prob', type=PROB, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--mixup-off-epoch', type=NATURAL, default=0)
    g.add_argument('--smoothing', type=RATE, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='random', choices=['random', *INTERPOLATIONS])
    g.add_argument('--drop', type=RATE, default=0.0, help='dropout before the classifier')
    g.add_argument('--drop-path', type=RATE, default=None, help='stochastic depth rate (grows linearly)')
    g.add_argument('--model-ema', action='store_true', help='keep an exponential moving average of the weights')
    g.add_argument('--model-ema-decay', type=PROB, default=0.9998)
    g.add_argument('--model-ema-force-cpu', action='store_true')
    g = parser.add_argument_group('Output')
    g.add_argument('--output', default='', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', help='run folder name (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    g.add_argument('--checkpoint-hist', type=COUNT, default=10, help='best checkpoints kept')
    g.add_argument('--recovery-interval', type=NATURAL, default=0,
                   help='also save recovery.pth.tar every N batches within an epoch (0: off)')
    g.add_argument('--log-tensorboard', action='store_true', help='also write TensorBoard event files')
    g.add_argument('--pin-mem', action='store_true',
                   help="the loaders' batches in pinned host memory, for faster copies to the GPU (CUDA only)")
    g.add_argument('--no-malloc-tuning', action='store_true',
                   help="on CPU, leave glibc's allocator as it is (by default every block comes from the heap and "
                        "freed memory stays there for the next step instead of being faulted in again: on a "
                        "2-core Xeon, Sequencer2D-S at batch 32 took 8.8 s per step with glibc's defaults and "
                        "8.5 s without)")
    g.add_argument('--no-prefetcher', action='store_true',
                   help="on CUDA, without timm's prefetcher (which copies the next batch to the GPU on a side "
                   "stream and normalises and erases it there); on the CPU there is none")
    g.add_argument('--device-augment', action='store_true',
                   help="decode the training JPEGs and run the random-resized crop, flips and RandAugment on the "
                        "training device, whole batches at a time (loader processes only read files and draw timm's "
                        "random parameters): for when the loader processes cannot keep up with the GPU")
    g.add_argument('--bad-samples', default='fail', choices=['fail', 'skip'],
                   help='unreadable images: fail naming the file, or skip and count them')
    g.add_argument('--nonfinite', default='stop', choices=['stop', 'skip'],
                   help='non-finite loss: stop keeping the last good checkpoint, or skip the step')
    g.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument('--check-args', action='store_true',
                   help='check the flags, the model name and that the data folder exists, then exit without '
                   'training (distributed_train.sh runs this once before torchrun)')
    return parser


def build_validate_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog='sequencer validate', description='Evaluate a Sequencer model: top-1, top-5, loss.',
        formatter_class=HelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file setting default values')
    _data_args(parser, training=False)
    _model_args(parser, training=False)
    parser.add_argument('--checkpoint', default='', help='weights to evaluate: a file in any supported layout, URL '
                        'or hf-hub: id (a training checkpoint also gives the head width and model arguments)')
    parser.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    parser.add_argument('--results-file', default='', help='write the results to this .csv or .json file')
    parser.add_argument('--bad-samples', default='fail', choices=['fail', 'skip'], help=argparse.SUPPRESS)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse ``argv``; a ``-c`` recipe sets defaults first. Returns the args and the YAML text of all values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                cfg = yaml.safe_load(f) or {}
        except OSError as e:
            raise UserError(f"{known.config}: cannot read recipe ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserError(f"{known.config}: not a text file (a recipe is YAML text)") from None
        except yaml.YAMLError as e:
            raise UserError(f"{known.config}: not valid YAML ({first_line(e)})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{known.config}: a recipe must be a mapping of option: value")
        if 'config' in cfg:
            raise UserError(f"{known.config}: config: a recipe cannot name another recipe (give one -c)")
        parser.set_defaults(**check_recipe(parser, cfg, known.config))
    args = parser.parse_args(argv)
    channels = args.in_chans or (args.input_size[0] if args.input_size else 3)
    for flag, values in (('--mean', args.mean), ('--std', args.std)):
        if values and len(values) not in (1, channels):
            raise UserError(f"{flag} {' '.join(map(str, values))}: give one value or one per channel ({channels})")
    for flag in ('--scale', '--ratio', '--cutmix-minmax'):
        low_high = getattr(args, flag[2:].replace('-', '_'), None)
        if low_high and low_high[0] > low_high[1]:
            raise UserError(f"{flag} {low_high[0]} {low_high[1]}: give the smaller value first")
    if args.data and args.data_dir and args.data != args.data_dir:
        if args.data_dir != parser.get_default('data_dir'):   # both on the command line (a recipe's gives way)
            raise UserError(f"the dataset given twice: DIR {args.data} and --data-dir {args.data_dir} (give one)")
        args.data_dir = args.data
    args.data_dir = args.data_dir or args.data
    return args, yaml.safe_dump({k: v for k, v in sorted(vars(args).items())}, default_flow_style=False)
