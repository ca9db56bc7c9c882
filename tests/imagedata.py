"""Tiny image datasets written by the tests: real JPEG files in the ImageFolder layout."""
import os

import numpy as np
from PIL import Image


def make_image_folder(root, classes=3, train_per_class=4, val_per_class=2, size=(40, 48), seed=0,
                      val_name='val', class_names=None):
    """``root/train/<class>/*.JPEG`` and ``root/<val_name>/<class>/*.JPEG``; each class has its own colour."""
    rng = np.random.default_rng(seed)
    names = class_names or [f'n{i:08d}' for i in range(classes)]
    for split, per in (('train', train_per_class), (val_name, val_per_class)):
        for c, name in enumerate(names):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            base = np.array([(c * 73) % 256, (c * 151) % 256, (c * 29 + 100) % 256], dtype=np.float32)
            for i in range(per):
                noise = rng.normal(0, 25, size=(size[0], size[1], 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{name}_{i}.JPEG'), quality=90)
    return str(root)
