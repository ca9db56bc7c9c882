"""``sequencer clean-checkpoint``: a training checkpoint -> weights-only safetensors with a sha256 prefix."""
import argparse

from .checkpoint_tools import clean_checkpoint


def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Strip a training checkpoint down to its weights (no optimizer, scheduler or scaler state; the EMA "
        "weights with --use-ema), in this project's (timm's) layout, as safetensors named "
        "<name>-<first 8 hex digits of its sha256>.safetensors, ready to publish and to load with "
        "--checkpoint or sequencer.load_checkpoint.")
    parser.add_argument('checkpoint', metavar='CHECKPOINT', help='training checkpoint (.pth.tar, .pth, ...)')
    parser.add_argument('--output', '-o', required=True, metavar='FILE_OR_DIR',
                        help="output name (e.g. out/sequencer2d_s.safetensors) or folder (then named after the "
                             "checkpoint's arch)")
    parser.add_argument('--use-ema', action='store_true', help='keep the EMA weights instead of the raw ones')
    parser.add_argument('--no-hash', action='store_true', help='do not add the sha256 prefix to the file name')


def run(args) -> int:
    path, sha = clean_checkpoint(args.checkpoint, args.output, use_ema=args.use_ema, add_hash=not args.no_hash)
    print(f"clean-checkpoint: wrote {path} (sha256 {sha})")
    return 0
