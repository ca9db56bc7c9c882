"""``sequencer avg-checkpoints``: average the weights of the last / best N checkpoints of a training run."""
import argparse

from .checkpoint_tools import average_checkpoints
from .io import check_output


def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Average the weights of several checkpoints of one run (element-wise mean; integer buffers from the "
        "newest). RUN is a run folder (its checkpoint-<epoch>.pth.tar files) or checkpoint files. --last N takes "
        "the N highest epochs, --best N the N best by the checkpoints' 'metric' (eval top-1 unless the run ranked "
        "by loss: then add --lower-is-better; summary.csv fills in a missing metric). Writes weights only: "
        "safetensors, or a plain state dict for a .pth/.pt/.bin --output.")
    parser.add_argument('run', nargs='+', metavar='RUN', help='run folder or checkpoint files')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--last', type=int, default=None, metavar='N', help='average the N most recent epochs')
    which.add_argument('--best', type=int, default=None, metavar='N', help='average the N best by metric')
    parser.add_argument('--lower-is-better', action='store_true', help="the 'metric' is a loss (lower is better)")
    parser.add_argument('--use-ema', action='store_true', help='average the EMA weights')
    parser.add_argument('--output', '-o', required=True, metavar='FILE',
                        help='output file (.safetensors, or .pth for a torch state dict)')


def run(args) -> int:
    check_output(args.output, '--output')
    sha, used = average_checkpoints(args.run, args.output, last=args.last, best=args.best, use_ema=args.use_ema,
                                    lower_is_better=args.lower_is_better)
    print(f"avg-checkpoints: wrote {args.output} (mean of {len(used)} checkpoints, sha256 {sha[:8]})")
    return 0
