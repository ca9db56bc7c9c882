#!/usr/bin/env python3
"""Train a Sequencer model: the same flags as `sequencer train` (timm train.py's flags)."""
import sys

from sequencer.cli import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))
