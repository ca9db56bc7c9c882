"""The embedded demo dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans of the UCI
ML digits set), written out once as an ImageFolder of 32x32 PNG files with a fixed 80 / 20 split."""
import os

import numpy as np
from PIL import Image


def write_digits(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (skipped when already complete)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    done = os.path.join(root, '.complete')
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (('val', idx[:n_val]), ('train', idx[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                img = Image.fromarray(pixels, mode='L').resize((size, size), Image.BILINEAR)
                img.save(os.path.join(folder, f'{i:04d}.png'))
    open(done, 'w').close()
    return root
