"""Loader throughput from disk (JPEG decode per step) vs the in-memory uint8 cache (--cache_data), next to the
training and feature-extraction throughput of a small model at the same resolution, in one run.

    python benchmarks/bench_data.py --input_size 64 --subset 4096 --num_workers 2
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
import models_vit  # noqa: E402
from util.datasets import build_image_dataset, pretrain_transform  # noqa: E402


def loader_rate(ds, args, batches):
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                         drop_last=True)
    it = iter(loader)
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * args.batch_size / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data_path', default='../shared/data/imagenette2-224')
    p.add_argument('--input_size', default=64, type=int)
    p.add_argument('--subset', default=4096, type=int)
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--num_workers', default=2, type=int)
    p.add_argument('--batches', default=20, type=int)
    p.add_argument('--model', default='mae_vit_micro_patch8')
    a = p.parse_args()
    a.cache_size = 0
    disk = build_image_dataset(a, 'train', pretrain_transform(a.input_size), cache=False)
    t = time.perf_counter()
    cached = build_image_dataset(a, 'train', pretrain_transform(a.input_size), cache=True)
    cache_time = time.perf_counter() - t
    r_disk, r_cache = loader_rate(disk, a, a.batches), loader_rate(cached, a, a.batches)
    torch.manual_seed(0)
    model = models_mae.MODELS[a.model](img_size=a.input_size, norm_pix_loss=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch_size, 3, a.input_size, a.input_size)
    times = []
    for i in range(6):
        t = time.perf_counter()
        model(x)[0].backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    r_train = a.batch_size / sorted(times[1:])[len(times[1:]) // 2]
    vit = models_vit.MODELS[models_vit.vit_for(a.model)](img_size=a.input_size, num_classes=0).eval()
    with torch.no_grad():
        vit(x)
        t = time.perf_counter()
        for _ in range(5):
            models_vit.forward_features_pooled(vit, x)
        r_feat = 5 * a.batch_size / (time.perf_counter() - t)
    print(f'# {a.subset} Imagenette train images at {a.input_size} px, batch {a.batch_size}, '
          f'{a.num_workers} loader workers, {torch.get_num_threads()} compute threads')
    print(f'# building the cache took {cache_time:.1f} s ({len(cached)} images, {cached.images.numel() / 2**20:.0f} MiB uint8)')
    print('| what | img/s |')
    print('|---|---:|')
    print(f'| loader, JPEG decode per step | {r_disk:.0f} |')
    print(f'| loader, in-memory cache (--cache_data) | {r_cache:.0f} |')
    print(f'| {a.model} training step (fwd + bwd + AdamW) | {r_train:.0f} |')
    print(f'| {models_vit.vit_for(a.model)} feature extraction (k-NN) | {r_feat:.0f} |')


if __name__ == '__main__':
    main()
