"""Dataset adapters and loaders (timm's factories) and the embedded demo dataset."""
from .loaders import check_data_dir, check_input_size, create_eval_dataset, create_eval_loader, data_config

__all__ = ['check_data_dir', 'check_input_size', 'create_eval_dataset', 'create_eval_loader', 'data_config']
