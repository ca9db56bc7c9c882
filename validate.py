#!/usr/bin/env python3
"""Evaluate a Sequencer model: the same flags as `sequencer validate` (timm validate.py's flags)."""
import sys

from sequencer.cli import main

if __name__ == '__main__':
    sys.exit(main(['validate', *sys.argv[1:]]))
