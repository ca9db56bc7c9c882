"""Write a synthetic JPEG image folder for timing input pipelines (``sequencer benchmark --data``).

    python benchmarks/make_jpegs.py DIR [--classes 10] [--per-class 256] [--size 500 375] [--processes N]

makes DIR/train/class_<c>/<i>.jpg: random content, smooth colour fields with grain on top, so that the files
are of the order of a photograph's of that size (500x375 at quality 90: about 85 kB, where an ImageNet training
image averages about 110 kB), unlike pure noise (several times larger) or flat colour (a few kB). The images
are split over processes (all the machine's cores by default); the same arguments give the same files. Each
file is written under a temporary name and renamed, so an interrupted run leaves no truncated image behind.
"""
import argparse
import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image


def image(seed: int, index: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng([seed, index])
    coarse_w, coarse_h = int(rng.integers(4, 24)), int(rng.integers(3, 18))
    coarse = rng.integers(0, 256, (coarse_h, coarse_w, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 12, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write(job) -> int:
    path, seed, index, width, height, quality = job
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp')
    image(seed, index, width, height).save(tmp, format='JPEG', quality=quality)
    os.replace(tmp, path)
    return os.path.getsize(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='make_jpegs.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('root', metavar='DIR', help='output folder (DIR/train/class_<c>/<i>.jpg)')
    parser.add_argument('--classes', type=int, default=10, help='class folders (default 10)')
    parser.add_argument('--per-class', type=int, default=256, help='images per class (default 256)')
    parser.add_argument('--size', type=int, nargs=2, default=(500, 375), metavar=('W', 'H'),
                        help='image width and height (default 500 375)')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality (default 90)')
    parser.add_argument('--processes', type=int, default=os.cpu_count() or 1,
                        help='processes writing the images (default: all cores)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.classes, args.per_class, *args.size, args.processes) < 1 or not 1 <= args.quality <= 100:
        print('make_jpegs.py: error: --classes, --per-class, --size and --processes must be at least 1, --quality '
              '1 to 100', file=sys.stderr)
        return 2
    jobs = []
    for c in range(args.classes):
        folder = os.path.join(args.root, 'train', f'class_{c:03d}')
        os.makedirs(folder, exist_ok=True)
        for i in range(args.per_class):
            jobs.append((os.path.join(folder, f'{i:05d}.jpg'), args.seed, c * args.per_class + i, *args.size,
                         args.quality))
    with Pool(min(args.processes, len(jobs))) as pool:
        sizes = pool.map(write, jobs, chunksize=max(1, len(jobs) // (8 * args.processes)))
    print(f"{len(jobs)} images of {args.size[0]}x{args.size[1]} in {args.classes} classes under "
          f"{os.path.join(args.root, 'train')}, {sum(sizes) / len(sizes) / 1e3:.0f} kB on average")
    return 0


if __name__ == '__main__':
    sys.exit(main())
