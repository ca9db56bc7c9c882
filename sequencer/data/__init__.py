"""Dataset adapters and loaders (timm's factories), the one image decoder, and the embedded demo dataset."""
from .images import load_image, open_image
from .loaders import check_data_dir, check_input_size, create_eval_dataset, create_eval_loader, data_config

__all__ = ['check_data_dir', 'check_input_size', 'create_eval_dataset', 'create_eval_loader', 'data_config',
           'load_image', 'open_image']
