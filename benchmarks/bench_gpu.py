"""GPU pretraining throughput, side by side in one run: MAE, CrossMAE (kept 0.75 / 0.25), CMAE and
transformers' ViTMAEForPreTraining at the same configuration, eager and torch.compile, for ViT-B/16 and
ViT-L/16 at 224 px; img/s, achieved TFLOP/s and its share of this GPU's measured bf16 matmul rate, peak
memory; then the loader's img/s for 224 px JPEGs with this machine's cores (util.datasets.build_loader, as the
training scripts use it: pinned memory, persistent workers, --prefetch_factor).

    python benchmarks/bench_gpu.py                          # on a GPU: base and large, batch 128, 20 timed steps
    python benchmarks/bench_gpu.py --device cpu --steps 2   # smoke check on a CPU (pico config, fp32, batch 8)
    python benchmarks/bench_gpu.py --attn sdpa,flash --no_loader   # a table per attention backend, no loader

benchmarks/gpu_check.sh runs this in pieces, each under a timeout, on a lent GPU.

A training step is what engine_pretrain runs: autocast (bf16 on CUDA), backward, fused AdamW (on CUDA). Steps are
interleaved across the variants (round-robin blocks of --block steps) so that drift hits all alike;
torch.cuda.synchronize is called only at the ends of each block, so the host queues kernels ahead as in training. Peak memory is reported as the variant would need it alone: its parameters and
optimizer state plus the step's peak above what was allocated before it (torch.cuda.max_memory_allocated).
A batch that does not fit is halved (the table says which batch ran). FLOPs: benchmarks/flops.py (matmuls only,
training = 3 x forward for the parts with gradients), the same as bench_pretrain.py.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
import bench_pretrain  # noqa: E402
import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
from util.datasets import build_dataset, build_loader, pretrain_transform  # noqa: E402

# name: (factory, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads), as bench_pretrain.CONFIGS
CONFIGS = {**bench_pretrain.CONFIGS,
           'large': ('mae_vit_large_patch16', 224, 16, 1024, 24, 16, 512, 8, 16),
           'pico': ('mae_vit_pico_patch4', 32, 4, 96, 4, 3, 64, 2, 4)}
GIB = 2 ** 30


class Run:
    def __init__(self, name, model, step, opt):
        self.name, self.model, self.step, self.opt = name, model, step, opt
        self.times, self.step_peaks, self.warmup_s = [], [], 0.0

    def static_bytes(self):
        """Parameters and optimizer state (after the first step, when AdamW has made its moments)."""
        tensors = list(self.model.parameters()) + [t for s in self.opt.state.values() for t in s.values()
                                                   if isinstance(t, torch.Tensor)]
        tensors += list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


def build_run(cfg, v, device, attn, compile_backend='inductor'):
    torch.manual_seed(0)
    model, step = bench_pretrain.build(v.replace('+compile', ''), cfg, norm_pix=True)
    model.to(device)
    if attn != 'sdpa' and hasattr(model, 'set_attention_backend'):
        model.set_attention_backend(attn)
    if v.endswith('+compile'):
        step = torch.compile(step, backend=compile_backend)  # forward and loss; backward via AOTAutograd
    opt = misc.adamw([p for p in model.parameters() if p.requires_grad], device, lr=1e-4, betas=(0.9, 0.95))
    return Run(v, model, step, opt)


def timed_steps(run, x, noise, amp_args, n):
    """n training steps back to back, timed with one synchronisation at each end (the CPU queues the next
    step's kernels while the GPU runs, as in training). -> (seconds per step, peak bytes above the start)"""
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(n):
        with misc.autocast(amp_args):
            loss = run.step(x, noise)
        loss.backward()
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    peak = torch.cuda.max_memory_allocated() - before if cuda else 0
    return dt, peak


def bench_config(name, batch, a, device, amp_args, attn):
    cfg = CONFIGS[name]
    length = (cfg[1] // cfg[2]) ** 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg[1], cfg[1], generator=g).to(device)
    noise = torch.rand(batch, length, generator=g).to(device)
    runs = {}
    for v in a.variants:  # built, then an untimed warm-up (compilation, cuDNN/cuBLAS autotuning)
        try:
            run = build_run(cfg, v, device, attn, a.compile_backend)
            t = time.perf_counter()
            if a.warmup:
                timed_steps(run, x, noise, amp_args, a.warmup)
            run.warmup_s = time.perf_counter() - t
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # e.g. a compilation error: this variant is left out, not the whole run
            print(f'# {name}, attention {attn}: {v} failed and is left out: {type(e).__name__}: '
                  f'{(str(e).splitlines() or [""])[0][:300]}')
            continue
        runs[v] = run
    for _ in range(-(-a.steps // a.block)):  # rounds: a block of steps per variant in turn
        for run in runs.values():
            dt, peak = timed_steps(run, x, noise, amp_args, a.block)
            run.times.append(dt)
            run.step_peaks.append(peak)
    return runs


def report(name, batch, runs, peak_rate, device, attn):
    cfg = CONFIGS[name]
    print(f'\n## {name}: {cfg[0]} at {cfg[1]} px, batch {batch}, decoder {cfg[6]}/{cfg[7]}/{cfg[8]}, norm_pix_loss, '
          f'mask 0.75; our attention: {attn}')
    print('| variant | img/s | vs MAE (ours, eager) | train GFLOP/img | achieved TFLOP/s | of matmul peak '
          '| peak memory GiB | warm-up s |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    base = statistics.median(runs['mae'].times) if 'mae' in runs else None
    for v, run in runs.items():
        med = statistics.median(run.times)
        total, _ = bench_pretrain.train_flops(v.replace('+compile', ''), cfg)
        rate = total * batch / med
        mem = f'{(run.static_bytes() + max(run.step_peaks)) / GIB:.1f}' if device.type == 'cuda' else '-'
        rel = f'{base / med:.2f}x' if base else '-'
        print(f'| {v} | {batch / med:.1f} | {rel} | {total / 1e9:.2f} | {rate / 1e12:.3g} | '
              f'{100 * rate / peak_rate:.0f}% | {mem} | {run.warmup_s:.1f} |')


def loader_rate(a, device):
    """img/s of build_loader over 224 px JPEGs (RandomResizedCrop, flip, normalize; copied to the device). Epoch 0
    starts the (persistent) workers, untimed; epoch 1 is timed from iter(), when no batch is queued yet, so
    prefetched batches do not inflate the rate."""
    args = argparse.Namespace(world_size=1, rank=0, seed=0, batch_size=a.loader_batch, num_workers=a.loader_workers,
                              pin_mem=True, device=device, prefetch_factor=a.prefetch_factor)
    ds = build_dataset(a.data_path, 'train', pretrain_transform(a.loader_size), a.loader_batches * a.loader_batch)
    loader = build_loader(ds, args)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        t, n = time.perf_counter(), 0
        for imgs, _ in loader:
            imgs = imgs.to(device, non_blocking=True)
            n += imgs.shape[0]
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t), len(ds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='auto', help='auto (cuda if available), cuda or cpu')
    p.add_argument('--configs', default=None, help='comma-separated (default: base,large on CUDA, pico on the CPU)')
    p.add_argument('--batch_size', default=None, type=int, help='default 128 on CUDA, 8 on the CPU')
    p.add_argument('--steps', default=20, type=int, help='timed steps per variant')
    p.add_argument('--block', default=None, type=int, help='steps per timed block (default 5 on CUDA, 1 on the CPU)')
    p.add_argument('--warmup', default=None, type=int, help='untimed steps first (default 3 on CUDA, 1 on the CPU)')
    p.add_argument('--variants', default=None,
                   help='default: mae,mae+compile,hf,hf+compile,cross75,cross25,cmae (CPU: the same without +compile, '
                        'which takes minutes to compile on a small CPU)')
    p.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'], help='auto: bf16 on CUDA, fp32 on CPU')
    p.add_argument('--attn', default='sdpa', help='our models\' attention backends, comma-separated: sdpa, flash, math '
                   '(a table each)')
    p.add_argument('--compile_backend', default='inductor', help='torch.compile backend of the +compile variants '
                   '(aot_eager or eager: a quick check of that path on a CPU, where inductor takes minutes)')
    p.add_argument('--data_path', default=os.environ.get('MAE_TEST_DATA', os.path.join(os.path.dirname(HERE), '..',
                                                                                      'shared', 'data', 'imagenette2-224')))
    p.add_argument('--loader_size', default=224, type=int)
    p.add_argument('--loader_batch', default=None, type=int, help='default 128 on CUDA, 16 on the CPU')
    p.add_argument('--loader_batches', default=None, type=int, help='batches per epoch (default 40 on CUDA, 4 on the CPU)')
    p.add_argument('--loader_workers', default=os.cpu_count() or 1, type=int)
    p.add_argument('--prefetch_factor', default=4, type=int)
    p.add_argument('--no_loader', action='store_true', help='skip the loader measurement')
    p.add_argument('--matmul_n', default=None, type=int, help='size of the matmul rate check (default 8192 on CUDA, '
                   '2048 on the CPU)')
    a = p.parse_args()
    a.attn = a.attn.split(',')
    if not set(a.attn) <= {'sdpa', 'flash', 'math'}:
        p.error(f'--attn: expected sdpa, flash or math, got {a.attn}')
    device = torch.device('cuda' if a.device == 'auto' and torch.cuda.is_available() else
                          ('cpu' if a.device == 'auto' else a.device))
    cuda = device.type == 'cuda'
    a.configs = (a.configs or ('base,large' if cuda else 'pico')).split(',')
    a.batch_size = a.batch_size or (128 if cuda else 8)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    a.block = max(1, min(a.block or (5 if cuda else 1), a.steps))
    a.loader_batch = a.loader_batch or (128 if cuda else 16)
    a.loader_batches = a.loader_batches or (40 if cuda else 4)
    variants = a.variants or ('mae,mae+compile,hf,hf+compile,cross75,cross25,cmae' if cuda else
                              'mae,hf,cross75,cross25,cmae')
    a.variants = variants.split(',')
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        a.variants = [v for v in a.variants if not v.startswith('hf')]
        print('# transformers is not installed: the hf variants are left out (pip install transformers)')
    amp_args = argparse.Namespace(device=device, amp=a.amp)
    misc.resolve_amp(amp_args)  # bf16 on CUDA, fp32 on the CPU; on CUDA also TF32 and cuDNN autotuning
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp_args.amp, torch.float32)
    a.matmul_n = a.matmul_n or (8192 if cuda else 2048)
    peak = bench_pretrain.matmul_rate(a.matmul_n, 20 if cuda else 10, device, dtype)
    name = torch.cuda.get_device_name(device) if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f'# {name}; torch {torch.__version__}' + (f', CUDA {torch.version.cuda}' if cuda else '') +
          f', transformers {hf_version}; flash-attn {"installed" if models_mae.flash_attn_func else "absent"}'
          f'; amp {amp_args.amp}; compile backend {a.compile_backend}')
    print(f'# measured {str(dtype).replace("torch.", "")} matmul rate ({a.matmul_n}^2): '
          f'{peak / 1e12:.3g} TFLOP/s; {a.steps} timed steps per variant (blocks of {a.block}) after {a.warmup} warm-up steps')
    first_rate = None
    for cfg in a.configs:
        batch = a.batch_size
        for attn in a.attn:
            while True:
                try:
                    runs = bench_config(cfg, batch, a, device, amp_args, attn)
                    break
                except torch.cuda.OutOfMemoryError:
                    if batch == 1:
                        raise
                gc.collect()  # the failed attempt's models are garbage once the exception is gone
                torch.cuda.empty_cache()
                print(f'# {cfg}: batch {batch} does not fit; trying {batch // 2}')
                batch //= 2
            report(cfg, batch, runs, peak, device, attn)
            if first_rate is None and 'mae' in runs:
                first_rate = (cfg, batch / statistics.median(runs['mae'].times))
            del runs
            if cuda:
                torch.cuda.empty_cache()
    if a.no_loader:
        print('\n# loader: skipped (--no_loader)')
    elif os.path.isdir(os.path.join(a.data_path, 'train')):
        rate, n = loader_rate(a, device)
        print(f'\n## loader: {a.loader_size} px JPEGs from {os.path.abspath(a.data_path)} ({n} images), batch '
              f'{a.loader_batch}, {a.loader_workers} workers, prefetch {a.prefetch_factor}, pinned, copied to {device.type}')
        print(f'| what | img/s |\n|---|---:|\n| loader (decode + RandomResizedCrop + flip + normalize) | {rate:.0f} |')
        if first_rate:
            print(f'| MAE (ours, eager) training, {first_rate[0]} | {first_rate[1]:.0f} |')
    else:
        print(f'\n# loader: no {a.data_path}/train (set --data_path or MAE_TEST_DATA); skipped')


if __name__ == '__main__':
    main()
