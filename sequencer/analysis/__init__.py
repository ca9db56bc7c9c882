"""The paper's analysis tools: FLOPs, and (elsewhere in this package) ERF, resolution and robustness."""
from .flops import count_flops, count_flops_by_kind, count_params

__all__ = ['count_flops', 'count_flops_by_kind', 'count_params']
