"""Packaging: pyproject's package data covers the C++ sources wherever they live, and (run as a script by
`make package`) the smoke test of an installed wheel.

`make package` builds the sdist and the wheel, installs the wheel into a fresh virtual environment and runs
this file there, from a temporary folder, with the source tree's root as its argument:
    python -I tests/test_package.py SOURCE_ROOT
It fails unless `sequencer` is imported from that environment's site-packages (not from the source tree),
the installed package holds the same C++ sources as the tree, and a model runs a forward pass.
"""
import fnmatch
import sys
from pathlib import Path

DIST_NAME = 'sequencer-lstm'
SOURCE_SUFFIXES = ('.cpp', '.h')


def csrc_files(package_dir: Path):
    """The C++ sources under ``package_dir`` (any ``csrc`` folder), relative to its parent, sorted."""
    return sorted(p.relative_to(package_dir.parent).as_posix() for p in package_dir.rglob('csrc/*')
                  if p.suffix in SOURCE_SUFFIXES)


def test_package_data_covers_the_cpp_sources():
    tomllib = __import__('pytest').importorskip('tomllib')
    root = Path(__file__).resolve().parent.parent
    with open(root / 'pyproject.toml', 'rb') as f:
        config = tomllib.load(f)
    assert config['project']['name'] == DIST_NAME
    package_data = config['tool']['setuptools']['package-data']
    files = csrc_files(root / 'sequencer')
    assert files, 'no C++ sources found under sequencer/'
    for rel in files:
        package_dir, name = rel.rsplit('/csrc/', 1)
        assert (root / package_dir / '__init__.py').is_file(), f'{package_dir} is not a package: {rel} not shipped'
        patterns = package_data.get(package_dir.replace('/', '.'), [])
        assert any(fnmatch.fnmatch(f'csrc/{name}', p) for p in patterns), \
            f'{rel} is not in [tool.setuptools.package-data] for {package_dir.replace("/", ".")}'


def test_dev_extra_has_the_export_extra():
    tomllib = __import__('pytest').importorskip('tomllib')
    with open(Path(__file__).resolve().parent.parent / 'pyproject.toml', 'rb') as f:
        extras = tomllib.load(f)['project']['optional-dependencies']
    assert set(extras['export']) <= set(extras['dev'])


def smoke(source_root: Path) -> None:
    import importlib.metadata
    import sysconfig

    import torch

    import sequencer

    site = Path(sysconfig.get_path('purelib')).resolve()
    package = Path(sequencer.__file__).resolve().parent
    if package.parent != site:
        sys.exit(f'FAIL: sequencer was imported from {package}, not from the installed wheel in {site}')
    version = importlib.metadata.version(DIST_NAME)
    if version != sequencer.__version__:
        sys.exit(f'FAIL: {DIST_NAME} {version} is installed but sequencer.__version__ is {sequencer.__version__}')

    installed = csrc_files(package)
    expected = csrc_files(source_root / 'sequencer')
    if not installed or installed != expected:
        sys.exit(f'FAIL: the installed package lacks C++ sources: installed {installed}, source tree {expected}')
    for rel in installed:
        if (site / rel).read_bytes() != (source_root / rel).read_bytes():
            sys.exit(f'FAIL: the installed {rel} differs from the source tree')

    model = sequencer.create_model('sequencer2d_s').eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 56, 56))
    if tuple(out.shape) != (1, 1000) or not torch.isfinite(out).all():
        sys.exit(f'FAIL: sequencer2d_s forward gave {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}')
    print(f'{DIST_NAME} {version} from {package}: {len(installed)} C++ sources ({", ".join(installed)}), '
          f'sequencer2d_s forward {tuple(out.shape)}')


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: python -I tests/test_package.py SOURCE_ROOT')
    smoke(Path(sys.argv[1]).resolve())
