#!/usr/bin/env python3
"""Benchmark a Sequencer model: ``python benchmark.py --model sequencer2d_s --batch-size 8 --compare-timm``.

The same options as ``sequencer benchmark``; see ``python benchmark.py --help``.
"""
import sys

from sequencer.analysis.benchmark import main

if __name__ == '__main__':
    sys.exit(main())
