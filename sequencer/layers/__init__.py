"""nn building blocks: recurrent token mixers, Sequencer blocks, downsampling."""
from .blocks import Downsample2D, SequencerBlock, Shuffle, default_norm
from .mixing import ENGINES, RNN1D, RNN2D, UNIONS

__all__ = ['Downsample2D', 'SequencerBlock', 'Shuffle', 'default_norm', 'ENGINES', 'RNN1D', 'RNN2D', 'UNIONS']
