"""The ``sequencer`` command. Thin: parse, call, print. Each sub-command lives in its own module that
offers ``add_arguments(parser)`` and ``run(args)``; user mistakes end as one line on stderr and exit 2."""
import argparse
import importlib
import sys

from .errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    'models': ('sequencer.models.table', 'list every model: parameters, FLOPs, paper top-1, published weights'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='sequencer', description='Sequencer: Deep LSTM for Image Classification.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        print(f"sequencer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
