"""The embedded demo: a small Sequencer2D trained and validated on real handwritten digits, on the CPU,
through the same ``train`` / ``validate`` code as ImageNet. No download.

The model, named ``sequencer2d_demo`` in the demo's output and checkpoints, is Sequencer2D-S's design cut down
to one block per stage and narrower layers (``--model-kwargs`` below): 0.72 M parameters, where
``sequencer2d_s`` has 27.65 M. Equivalent command line (after the digits are written to output/demo/digits):

    sequencer train output/demo/digits --model sequencer2d_s --model-kwargs layers='(1,1,1,1)'
        patch_sizes='(4,2,1,1)' embed_dims='(64,128,128,128)' hidden_sizes='(16,32,32,32)'
        --img-size 32 --crop-pct 1.0 --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 -b 32 -j 0 --opt adamw
        --lr 2e-3 --weight-decay 0.05 --epochs 12 --warmup-epochs 1 --sched cosine --smoothing 0.1
        --scale 0.75 1.0 --hflip 0 --color-jitter 0 --checkpoint-hist 1 --output output/demo
        --experiment digits-run
"""
import os
import time

from ..data.demo import write_digits
from . import train as train_mod
from . import validate as validate_mod
from .args import COUNT, HelpFormatter, Parser, build_train_parser, build_validate_parser, parse
from .io import check_output

NAME = 'sequencer2d_demo'   # what the demo calls its model: sequencer2d_s's design, cut down by MODEL's kwargs
MODEL = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'patch_sizes=(4,2,1,1)',
         'embed_dims=(64,128,128,128)', 'hidden_sizes=(16,32,32,32)']
DATA = ['--img-size', '32', '--crop-pct', '1.0', '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5']
RECIPE = ['-b', '32', '-j', '0', '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05', '--epochs', '12',
          '--warmup-epochs', '1', '--sched', 'cosine', '--smoothing', '0.1', '--scale', '0.75', '1.0',
          '--hflip', '0', '--color-jitter', '0', '--log-interval', '20', '--checkpoint-hist', '1']


def build_parser() -> Parser:
    p = Parser(prog='sequencer demo', description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('--output', default=os.path.join('output', 'demo'), help='where data and the run go')
    p.add_argument('--epochs', type=COUNT, default=None, help="epochs (default: the recipe's 12)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_output(a.output, '--output', folder=True)
    t0 = time.time()
    data = write_digits(os.path.join(a.output, 'digits'))
    experiment = 'digits-run'
    extra = ['--epochs', str(a.epochs)] if a.epochs else []
    args, _ = parse(build_train_parser(), [data, *MODEL, *DATA, *RECIPE, *extra, '--output', a.output,
                                           '--experiment', experiment])
    folder = os.path.join(a.output, experiment)
    if any(os.path.exists(os.path.join(folder, f)) for f in ('last.pth.tar', 'recovery.pth.tar')):
        args.resume = 'auto'  # a finished run stays finished; an interrupted one continues
    args.resume_hint = f"run `sequencer demo --output {a.output}` again to continue"
    args.model_name = NAME
    result = train_mod.train(args)
    if result.get('interrupted'):
        return train_mod.exit_status(result)
    best = os.path.join(folder, 'model_best.pth.tar')
    vargs, _ = parse(build_validate_parser(), [data, *MODEL, *DATA, '--checkpoint', best, '-b', '64', '-j', '0',
                                               '--results-file', os.path.join(folder, 'validation.json')])
    val = validate_mod.validate(vargs)
    minutes = (time.time() - t0) / 60
    print('\n== Sequencer demo: handwritten digits, CPU ==')
    print(f"model             {train_mod.model_label(args)}, {val['param_count']:.2f} M parameters")
    print(f"validation top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  ({val['images']} images)")
    print(f"time              {minutes:.1f} min")
    print(f"best checkpoint   {best}")
    print(f"training curves   {os.path.join(folder, 'train_curve.png')}")
    print(f"summary           {os.path.join(folder, 'summary.csv')}")
    return 0
