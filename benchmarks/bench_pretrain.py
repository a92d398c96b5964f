"""Pretraining throughput, measured side by side in one run: MAE, CrossMAE (kept 0.75 / 0.25), CMAE and
transformers' ViTMAEForPreTraining at the same configuration, optionally torch.compile; plus the share of this
machine's measured fp32 matmul rate that each achieves (analytic FLOPs, benchmarks/flops.py).

    python benchmarks/bench_pretrain.py --config base --batch_size 8 --steps 6
    python benchmarks/bench_pretrain.py --config small --batch_size 64 --steps 20 --compile
Steps are interleaved across variants (round-robin) so that machine noise hits all of them alike.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
import models_cmae  # noqa: E402
import models_mae  # noqa: E402

CONFIGS = {  # name: (factory, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads)
    'base': ('mae_vit_base_patch16', 224, 16, 768, 12, 12, 512, 8, 16),
    'small': ('mae_vit_micro_patch8', 64, 8, 192, 6, 3, 128, 2, 4),
}


def matmul_rate(n=2048, reps=10, device='cpu', dtype=torch.float32):
    """FLOP/s of an n x n matmul (fp32 on the CPU by default; on CUDA synchronised around the timed loop)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def hf_model(cfg, norm_pix):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    _, img, patch, dim, depth, heads, ddim, ddepth, dheads = cfg
    conf = ViTMAEConfig(image_size=img, patch_size=patch, hidden_size=dim, num_hidden_layers=depth,
                        num_attention_heads=heads, intermediate_size=4 * dim, decoder_hidden_size=ddim,
                        decoder_num_hidden_layers=ddepth, decoder_num_attention_heads=dheads,
                        decoder_intermediate_size=4 * ddim, layer_norm_eps=1e-6, qkv_bias=True,
                        norm_pix_loss=norm_pix, mask_ratio=0.75, attn_implementation='sdpa')
    return ViTMAEForPreTraining(conf)


def build(variant, cfg, norm_pix):
    name = cfg[0]
    if variant == 'hf':
        model = hf_model(cfg, norm_pix)
        return model, lambda x, noise: model(pixel_values=x, noise=noise).loss
    if variant == 'cmae':
        model = models_cmae.cmae_model(name, img_size=cfg[1], norm_pix_loss=norm_pix)
        return model, lambda x, noise: model(x, x.flip(-1), mask_ratio=0.75, noise=noise)[0]
    kw = dict(img_size=cfg[1], norm_pix_loss=norm_pix)
    kept = None
    if variant.startswith('cross'):
        kw.update(cross_mae=True, weight_fm=True, use_input=True)
        kept = {'cross75': 0.75, 'cross25': 0.25}[variant]
    model = models_mae.MODELS[name](**kw)
    if variant == 'mae+compile':
        compiled = torch.compile(model)
        return model, lambda x, noise: compiled(x, mask_ratio=0.75, noise=noise)[0]
    return model, lambda x, noise: model(x, mask_ratio=0.75, noise=noise, kept_mask_ratio=kept)[0]


def train_flops(variant, cfg):
    _, img, patch, dim, depth, _, ddim, ddepth, _ = cfg
    if variant in ('mae', 'hf', 'mae+compile'):
        enc, dec = flops.mae_forward(img, patch, dim, depth, ddim, ddepth)
        return 3 * (enc + dec), dec
    if variant.startswith('cross'):
        kept = {'cross75': 0.75, 'cross25': 0.25}[variant]
        enc, dec = flops.mae_forward(img, patch, dim, depth, ddim, ddepth, cross=True, kept_ratio=kept,
                                     weight_fm=True, use_input=True)
        return 3 * (enc + dec), dec
    enc, dec = flops.mae_forward(img, patch, dim, depth, ddim, ddepth)
    target, online = flops.cmae_extra_forward(img, patch, dim, depth, ddim)
    return 3 * (enc + dec + online) + target, dec


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--config', default='small', choices=list(CONFIGS))
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--steps', default=10, type=int, help='timed steps per variant')
    p.add_argument('--variants', default='mae,hf,cross75,cross25,cmae')
    p.add_argument('--compile', action='store_true', help='add MAE under torch.compile')
    p.add_argument('--threads', default=0, type=int)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    variants = a.variants.split(',') + (['mae+compile'] if a.compile else [])
    torch.manual_seed(0)
    runs = {}
    for v in variants:
        model, step = build(v, cfg, norm_pix=True)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, betas=(0.9, 0.95))
        runs[v] = (model, step, opt, [])
    length = (cfg[1] // cfg[2]) ** 2
    x = torch.randn(a.batch_size, 3, cfg[1], cfg[1])
    noise = torch.rand(a.batch_size, length)
    for i in range(a.steps + 2):  # two untimed warm-up rounds (compilation happens there)
        for v, (model, step, opt, times) in runs.items():
            t = time.perf_counter()
            loss = step(x, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t)
    peak = matmul_rate()
    print(f'# {a.config}: {cfg[0]} at {cfg[1]} px, batch {a.batch_size}, {a.steps} timed steps each, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}')
    print(f'# measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s')
    base = statistics.median(runs['mae'][3]) if 'mae' in runs else None
    print('| variant | img/s | vs MAE (ours) | train GFLOP/img | decoder fwd GFLOP/img | achieved GFLOP/s | of matmul peak |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for v, (_, _, _, times) in runs.items():
        med = statistics.median(times)
        total, dec = train_flops(v, cfg)
        rate = total * a.batch_size / med
        print(f'| {v} | {a.batch_size / med:.1f} | {base / med if base else float("nan"):.2f}x | {total / 1e9:.2f} | '
              f'{dec / 1e9:.3f} | {rate / 1e9:.1f} | {100 * rate / peak:.0f}% |')


if __name__ == '__main__':
    main()
