"""Mask-generation time per batch for every mask type, as a share of one training step of
mae_vit_base_patch16 at the same batch, measured in one run.

    python benchmarks/bench_masks.py --batch_size 64 --steps 2 --reps 50

Mask timings are interleaved with the training steps (--rounds blocks of --reps batches per type before each
step) so that drift on a shared machine hits both; each cell is the median block (the fastest in brackets),
with torch on one thread and on all of them: the masks' ops are tiny, and where the cores are shared a second
OpenMP thread that is descheduled stalls them for milliseconds. On one thread the calling thread's CPU time is
given too: what the masks cost where they have a core to themselves.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import masking  # noqa: E402
import models_mae  # noqa: E402


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or 'unknown CPU'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--steps', default=2, type=int, help='timed ViT-B training steps')
    p.add_argument('--reps', default=50, type=int, help='mask batches per type in a timed block')
    p.add_argument('--rounds', default=5, type=int, help='timed blocks per type before each training step')
    p.add_argument('--model', default='mae_vit_base_patch16')
    p.add_argument('--input_size', default=224, type=int)
    a = p.parse_args()
    torch.manual_seed(0)
    model = models_mae.MODELS[a.model](img_size=a.input_size, norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    grid = model.grid_size
    gens = {t: masking.MaskGenerator(t, grid, 0.75, seed=0) for t in masking.MASK_TYPES}
    for gen in gens.values():
        gen(a.batch_size)  # warm-up
    threads = sorted({1, torch.get_num_threads()})
    step_times, mask_times, cpu_times = [], {(t, n): [] for t in gens for n in threads}, {t: [] for t in gens}
    for i in range(a.steps + 1):
        for _ in range(a.rounds):
            for (t, n), times in mask_times.items():
                torch.set_num_threads(n)
                s, c = time.perf_counter(), time.thread_time()
                for _ in range(a.reps):
                    gens[t](a.batch_size)
                times.append((time.perf_counter() - s) / a.reps)
                if n == 1:
                    cpu_times[t].append((time.thread_time() - c) / a.reps)
        torch.set_num_threads(threads[-1])
        s = time.perf_counter()
        loss = model(x, mask_ratio=0.75, noise=gens['random'](a.batch_size))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            step_times.append(time.perf_counter() - s)
    step = statistics.median(step_times)
    load = f'; load average {os.getloadavg()[0]:.1f}' if hasattr(os, 'getloadavg') else ''
    print(f'# {cpu_name()}, {os.cpu_count()} cores{load}; torch {torch.__version__}')
    print(f'# {a.model} at {a.input_size} px, batch {a.batch_size}: training step {step:.2f} s on {threads[-1]} '
          f'threads (median of {a.steps}), grid {grid[0]}x{grid[1]}; masks: {a.rounds * (a.steps + 1)} blocks of '
          f'{a.reps} batches')
    print('| mask type | CPU ms per batch, 1 thread | ' +
          ' | '.join(f'ms per batch, {n} thread{"s" * (n > 1)}' for n in threads) + ' | share of a training step |')
    print('|---|' + '---:|' * (len(threads) + 2))
    for t in gens:
        times = [cpu_times[t]] + [mask_times[t, n] for n in threads]
        cells = [f'{1e3 * statistics.median(ts):.2f} ({1e3 * min(ts):.2f})' for ts in times]
        share = 100 * statistics.median(times[-1]) / step
        print(f'| {t} | ' + ' | '.join(cells) + f' | {share:.3f}% |')


if __name__ == '__main__':
    main()
