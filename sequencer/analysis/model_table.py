"""The model table as text: ``sequencer models`` and the README's table are printed from ``MODELS``."""
from typing import Dict, List

from ..errors import UserError
from ..models import MODELS, create_model, list_models
from .flops import count_flops, count_params

COLUMNS = ('model', 'params (M)', 'GMACs', 'input', 'paper top-1', 'weights', 'what it is')


def rows(pattern: str = '*') -> List[Dict]:
    """One row per model, measured on the model itself (parameters, MACs at its default input size)."""
    out = []
    for name in list_models(pattern):
        spec = MODELS[name]
        model = create_model(name)
        out.append({
            'model': name,
            'params (M)': f"{count_params(model) / 1e6:.2f}",
            'GMACs': f"{count_flops(model, spec.input_size) / 1e9:.2f}",
            'input': spec.input_size[-1],
            'paper top-1': f"{spec.top1:.1f}" if spec.top1 else '',
            'weights': 'yes' if spec.weights else '',
            'what it is': spec.description,
        })
    return out


def markdown(table: List[Dict]) -> str:
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(str(r[c]) for c in COLUMNS) + ' |' for r in table]
    return '\n'.join(lines)


def plain(table: List[Dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in COLUMNS}
    lines = ['  '.join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ['  '.join(str(r[c]).ljust(widths[c]) for c in COLUMNS).rstrip() for r in table]
    return '\n'.join(lines)


def add_arguments(parser):
    parser.add_argument('pattern', nargs='?', default='*', help="glob over model names (default '*')")
    parser.add_argument('--markdown', action='store_true', help='print a markdown table (as in the README)')


def run(args):
    table = rows(args.pattern)
    if not table:
        raise UserError(f"no model matches {args.pattern!r}; see `sequencer models`")
    print(markdown(table) if args.markdown else plain(table))
