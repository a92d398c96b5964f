"""Mask-generation time per batch for every mask type, as a share of one training step of
mae_vit_base_patch16 at the same batch, measured in one run.

    python benchmarks/bench_masks.py --batch_size 64 --steps 2 --reps 50
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--steps', default=2, type=int, help='timed ViT-B training steps')
    p.add_argument('--reps', default=50, type=int, help='timed mask batches per type')
    p.add_argument('--model', default='mae_vit_base_patch16')
    p.add_argument('--input_size', default=224, type=int)
    a = p.parse_args()
    torch.manual_seed(0)
    model = models_mae.MODELS[a.model](img_size=a.input_size, norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    grid = model.grid_size
    gens = {t: masking.MaskGenerator(t, grid, 0.75, seed=0) for t in masking.MASK_TYPES}
    step_times, mask_times = [], {t: [] for t in gens}
    for i in range(a.steps + 1):
        for t, gen in gens.items():  # interleaved with the training steps
            s = time.perf_counter()
            for _ in range(a.reps):
                gen(a.batch_size)
            mask_times[t].append((time.perf_counter() - s) / a.reps)
        s = time.perf_counter()
        loss = model(x, mask_ratio=0.75, noise=gens['random'](a.batch_size))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up
            step_times.append(time.perf_counter() - s)
    step = statistics.median(step_times)
    print(f'# {a.model} at {a.input_size} px, batch {a.batch_size}: training step {step:.2f} s '
          f'(median of {a.steps}), grid {grid[0]}x{grid[1]}, {torch.get_num_threads()} threads')
    print('| mask type | ms per batch | share of a training step |')
    print('|---|---:|---:|')
    for t, ts in mask_times.items():
        m = statistics.median(ts)
        print(f'| {t} | {1e3 * m:.2f} | {100 * m / step:.3f}% |')


if __name__ == '__main__':
    main()
