"""The one image decoder: training, validation, predict and erf read every image file through ``open_image``."""
import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

IMAGE_MODES = {1: 'L', 3: 'RGB'}   # input channels -> the mode images are decoded to


def image_mode(channels: int, flag: str) -> str:
    """The mode images are decoded to for a model of ``channels`` input channels; any other count is one line
    naming ``flag``."""
    if channels not in IMAGE_MODES:
        raise UserError(f"{flag}: images are read as RGB (3 channels) or grayscale (1)")
    return IMAGE_MODES[channels]


def open_image(path, mode: str = 'RGB') -> Image.Image:
    """An image in ``mode`` ('RGB', or 'L' for one-channel models): EXIF orientation applied; grayscale, CMYK,
    RGBA, palette and 16-bit images converted. Truncated files, non-images and decompression bombs raise PIL's
    errors (its limit on pixel count applies)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit: keep the high byte, not a clipped copy
            # always scaled from the 16-bit range: a dark image (every value below 256) stays dark
            arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
            img = Image.fromarray((arr >> 8).astype(np.uint8))
        elif img.mode == 'P' and 'transparency' in img.info:
            img = img.convert('RGBA')
        return img.convert(mode)


def load_image(path: str, mode: str = 'RGB') -> Image.Image:
    """``open_image``, with an unreadable file as a ``UserError`` naming it (for commands given image paths)."""
    try:
        return open_image(path, mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
