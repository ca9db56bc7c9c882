"""Where one training (or inference) step of a model spends its time: torch.profiler's table of the most
expensive operators and kernels, by self time on the device (CUDA) or on the CPU.

    python benchmarks/profile_step.py [--model sequencer2d_s] [--device cuda|cpu] [--batch-size N]
        [--precision fp32|bf16|fp16] [--rnn-engine fused] [--mode train|infer] [--top 30] [--timm]

Defaults follow the device: batch 256 under bf16 autocast on CUDA, batch 8 in float32 on the CPU.

``--timm`` profiles timm's model of the same name instead (same architecture, native LSTMs).
"""
import argparse
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='sequencer2d_s')
    p.add_argument('--device', default='cuda', choices=('cpu', 'cuda'))
    p.add_argument('--batch-size', type=int, default=None, help='default: 256 on CUDA, 8 on the CPU')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default=None,
                   help='default: bf16 on CUDA, fp32 on the CPU')
    p.add_argument('--rnn-engine', choices=('auto', 'native', 'fused'), default='fused')
    p.add_argument('--mode', choices=('train', 'infer'), default='train')
    p.add_argument('--top', type=int, default=30)
    p.add_argument('--timm', action='store_true', help="profile timm's model instead")
    args = p.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('profile_step.py: no CUDA device')
    dev = torch.device(args.device)
    cuda = dev.type == 'cuda'
    args.batch_size = args.batch_size or (256 if cuda else 8)
    args.precision = args.precision or ('bf16' if cuda else 'fp32')
    if args.timm:
        import timm
        model = timm.create_model(args.model)
    else:
        from sequencer import create_model
        model = create_model(args.model, rnn_engine=args.rnn_engine)
    model.to(dev).train(args.mode == 'train')
    dt = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)
    target = torch.randint(0, 1000, (args.batch_size,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            if args.mode == 'infer':
                with torch.no_grad():
                    model(x)
                return
            loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == 'cuda':
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
    key = 'self_cuda_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == '__main__':
    main()
