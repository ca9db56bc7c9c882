"""The ``sequencer`` command. Thin: parse, call, print. Each sub-command lives in its own module that
offers ``add_arguments(parser)`` and ``run(args)``; user mistakes end as one line on stderr and exit 2."""
import argparse
import importlib
import signal
import sys
import threading

from .engine.args import Parser
from .errors import UserError, one_line

# name -> (module, one-line help)
COMMANDS = {
    'models': ('sequencer.analysis.model_table', 'list every model: parameters, FLOPs, paper top-1, published weights'),
    'erf': ('sequencer.analysis.erf', 'effective receptive field of each stage: heatmaps (PNG) and arrays (.npy)'),
    'resolution': ('sequencer.analysis.resolution', 'top-1 at several test resolutions, one plot for several models'),
    'robustness': ('sequencer.analysis.robustness', 'ImageNet-C mCE, ImageNet-A / -R / -Sketch / V2 top-1: one table'),
    'avg-checkpoints': ('sequencer.engine.avg_checkpoints',
                        'average the weights of the last / best N checkpoints of a run'),
    'clean-checkpoint': ('sequencer.engine.clean_checkpoint',
                         'training checkpoint -> weights-only safetensors named with its sha256'),
    'predict': ('sequencer.export.predict', 'top-k classes of images, with class names (text or JSON)'),
    'export': ('sequencer.export.export', 'ONNX or TorchScript file, checked against PyTorch'),
    'build-kernel': ('sequencer.fast.build_kernel',
                     "build the fused engine's compiled CPU recurrence now (otherwise built on first use)"),
    'autotune': ('sequencer.fast.autotune',
                 "the 'auto' engine's measured choices on this processor: list them, or --clear"),
    'benchmark': ('sequencer.analysis.benchmark',
                  'throughput, latency and peak memory; --compare-timm times timm alongside'),
}


# commands with parsers of their own (timm's flag sets, YAML recipes): name -> (module with main(argv), help)
OWN_PARSER = {
    'demo': ('sequencer.engine.demo',
             'train and validate a small Sequencer2D on an embedded digits dataset (CPU, minutes)'),
    'train': ('sequencer.engine.train', 'train or fine-tune (timm train.py flags; -c recipe.yaml)'),
    'validate': ('sequencer.engine.validate', 'evaluate top-1 / top-5 / loss (timm validate.py flags)'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog='sequencer', description='Sequencer: Deep LSTM for Image Classification.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=Parser)
    for name, (_, help_) in OWN_PARSER.items():
        sub.add_parser(name, help=help_, add_help=False)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OWN_PARSER:
        return _run(argv[0], lambda: importlib.import_module(OWN_PARSER[argv[0]][0]).main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _run(args.command, lambda: importlib.import_module(args._module).run(args))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that what it was writing is cleaned up as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _run(command: str, work) -> int:
    """``work()``'s exit status; a user mistake is one line and 2, Ctrl-C before a command saves anything (or in
    one that has nothing to save) one line and 130, SIGTERM the same and 143. (``train`` installs handlers of its
    own while it trains, which save the run first.)"""
    old = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return work() or 0
    except UserError as e:
        print(f"sequencer {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"sequencer {command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"sequencer {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == '__main__':
    sys.exit(main())
