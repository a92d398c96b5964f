"""Data-independent patch masks behind one interface: per-patch scores `noise [N, L]`.

A model keeps the `len_keep = int(L * (1 - mask_ratio))` patches with the *lowest* scores (argsort ascending,
as MAE's random masking does), so any generator here can drive any model without changing the model code.

Types
- random: uniform noise from the global torch RNG, bit-for-bit what MAE's `random_masking` draws.
- white, red, blue, green, purple: ColorMAE (Hinojosa et al., ECCV 2024). Gaussian white noise W filtered with
  Gaussians G_s (sigma in *patch* units, applied in the Fourier domain, periodic):
      red    = G_red * W                 low-pass: blobs of visible patches
      blue   = W - G_blue * W            high-pass: visible patches spread apart
      green  = G_s1 * W - G_s2 * W       band-pass (s1 < s2): blobs at a preferred spacing
      purple = W - green                 band-stop
  Each pattern is standardized. A bank of patterns larger than the patch grid is generated once from a seed;
  every sample takes its own pattern, window offset and flips, and its *highest* values stay visible (we
  return the negated window so that "lowest kept" holds).
  Default widths: red/blue sigma 1.0 patch (spectral cut-off near 0.19 cycles/patch); green sigmas
  (0.7, 1.4) put the band-pass peak at 0.22 cycles/patch, i.e. blobs about 4.5 patches apart, so a 14x14
  grid holds about three per axis and an 8x8 grid about two.
- block: BEiT-style block-wise masking (rectangles of >= 4 patches, aspect ratio in [0.3, 1/0.3]).
- block2x2: CMAE's masking of aligned 2x2 patch blocks (random order of blocks, the grid must be even).

This file imports only torch and numpy and can be copied into another project on its own.
`python masking.py --out masks.png` draws example masks, patterns and their power spectra (needs matplotlib).
"""
import math

import numpy as np
import torch

MASK_TYPES = ('random', 'white', 'red', 'blue', 'green', 'purple', 'block', 'block2x2')
COLORS = ('white', 'red', 'blue', 'green', 'purple')
DEFAULT_SIGMAS = {'red': 1.0, 'blue': 1.0, 'green': (0.7, 1.4), 'purple': (0.7, 1.4)}


def num_keep(num_patches, mask_ratio):
    """The number of visible patches, as MAE computes it."""
    return int(num_patches * (1 - mask_ratio))


def _grid(grid_size):
    return (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)


def colored_noise_patterns(color, num_patterns, size, generator=None, sigmas=None):
    """Standardized colored-noise patterns [num_patterns, H, W] (float32), size = int or (H, W) in patches."""
    if color not in COLORS:
        raise ValueError(f'unknown noise color {color!r}; choose from {COLORS}')
    h, w = _grid(size)
    sigmas = {**DEFAULT_SIGMAS, **(sigmas or {})}
    white = torch.randn(num_patterns, h, w, generator=generator, dtype=torch.float64)
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2  # squared frequency in cycles/patch

    def gauss(s):  # transfer function of a spatial Gaussian of std s
        return torch.exp(-2 * math.pi ** 2 * s ** 2 * f2)

    if color == 'white':
        response = torch.ones_like(f2)
    elif color == 'red':
        response = gauss(sigmas['red'])
    elif color == 'blue':
        response = 1 - gauss(sigmas['blue'])
    elif color == 'green':
        response = gauss(sigmas['green'][0]) - gauss(sigmas['green'][1])
    else:  # purple
        response = 1 - (gauss(sigmas['purple'][0]) - gauss(sigmas['purple'][1]))
    x = torch.fft.ifft2(torch.fft.fft2(white) * response).real
    x = x - x.mean(dim=(1, 2), keepdim=True)
    x = x / x.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return x.float()


def radial_power_spectrum(patterns, num_bins=8):
    """Radially averaged power spectrum of patterns [P, H, W] -> [num_bins] over (0, 0.5] cycles/patch."""
    p = patterns.double()
    power = torch.fft.fft2(p - p.mean(dim=(-2, -1), keepdim=True)).abs().pow(2).mean(0)
    fy, fx = torch.fft.fftfreq(p.shape[-2], dtype=torch.float64), torch.fft.fftfreq(p.shape[-1], dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    edges = torch.linspace(0, 0.5, num_bins + 1, dtype=torch.float64)
    out = torch.zeros(num_bins, dtype=torch.float64)
    for i in range(num_bins):
        sel = (radius > edges[i]) & (radius <= edges[i + 1])
        out[i] = power[sel].mean()
    return out


def load_patterns(path):
    """ColorMAE's pattern files: .npz whose first array is [num_patterns, M, N] (also .npy)."""
    data = np.load(path, allow_pickle=False)
    arr = data[data.files[0]] if hasattr(data, 'files') else data
    if arr.ndim != 3:
        raise ValueError(f'{path}: expected patterns of shape [num_patterns, M, N], got {tuple(arr.shape)}')
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def save_patterns(path, patterns):
    """Write a bank in ColorMAE's format (.npz, first array [num_patterns, M, N])."""
    np.savez(path, patterns=patterns.detach().cpu().numpy().astype(np.float32))


def parse_mask_schedule(text):
    """'200:blue,250:red' -> [(200, 'blue'), (250, 'red')], sorted by epoch."""
    if not text:
        return []
    out = []
    for item in text.split(','):
        epoch, _, kind = item.strip().partition(':')
        if not epoch.strip().isdigit() or kind.strip() not in MASK_TYPES:
            raise ValueError(f'bad --mask_schedule entry {item!r}: expected EPOCH:TYPE with TYPE in {MASK_TYPES}')
        out.append((int(epoch), kind.strip()))
    return sorted(out)


def mask_type_at(epoch, base_type, schedule):
    """The mask type in force at `epoch`: the last schedule entry whose epoch is <= it, else base_type."""
    kind = base_type
    for start, k in schedule:
        if epoch >= start:
            kind = k
    return kind


class MaskGenerator:
    """Draws per-patch scores `noise [N, L]` (lowest kept) for one mask type on a patch grid.

    Everything random except the `random` type comes from a private torch.Generator seeded by `seed`, so a
    run's masks are reproducible and `state_dict()` restores them exactly on resume.
    """

    def __init__(self, mask_type='random', grid_size=14, mask_ratio=0.75, seed=0, device='cpu',
                 num_patterns=256, pattern_size=None, patterns=None, sigmas=None):
        if mask_type not in MASK_TYPES:
            raise ValueError(f'unknown mask type {mask_type!r}; choose from {MASK_TYPES}')
        self.mask_type, self.grid, self.mask_ratio = mask_type, _grid(grid_size), mask_ratio
        self.device = torch.device(device)
        self.rng = torch.Generator().manual_seed(seed)
        gh, gw = self.grid
        if mask_type == 'block2x2' and (gh % 2 or gw % 2):
            raise ValueError(f'block2x2 masking needs an even patch grid, got {gh}x{gw}')
        self.patterns = None
        if mask_type in COLORS:
            if patterns is None:
                size = pattern_size or max(32, 2 * max(gh, gw))
                patterns = colored_noise_patterns(mask_type, num_patterns, size, self.rng, sigmas)
            if patterns.shape[-2] < gh or patterns.shape[-1] < gw:
                raise ValueError(f'patterns of {tuple(patterns.shape[-2:])} are smaller than the {gh}x{gw} patch grid')
            self.patterns = patterns.to(self.device)

    @property
    def num_patches(self):
        return self.grid[0] * self.grid[1]

    def __call__(self, batch_size):
        """-> noise [batch_size, L] on self.device; the lowest int(L * (1 - mask_ratio)) are visible."""
        if self.mask_type == 'random':
            return torch.rand(batch_size, self.num_patches, device=self.device)  # as MAE draws it
        if self.patterns is not None:
            return -self._windows(batch_size).flatten(1)  # highest pattern values stay visible
        if self.mask_type == 'block2x2':
            return self._to_device(self._block2x2(batch_size))
        return self._to_device(self._beit_blocks(batch_size))

    def _to_device(self, t):
        """CPU -> self.device without waiting for the GPU: pinned memory and a non_blocking copy on CUDA (a plain
        .to() from pageable memory synchronises the stream every step)."""
        if self.device.type != 'cuda':
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _windows(self, n):
        """A random window of the patch grid's size from a random pattern per sample, randomly flipped."""
        gh, gw = self.grid
        _, ph, pw = self.patterns.shape
        idx = torch.randint(self.patterns.shape[0], (n,), generator=self.rng)
        top = torch.randint(ph - gh + 1, (n, 1), generator=self.rng)
        left = torch.randint(pw - gw + 1, (n, 1), generator=self.rng)
        flip = torch.rand(n, 2, generator=self.rng) < 0.5
        rows = torch.where(flip[:, :1], gh - 1 - torch.arange(gh), torch.arange(gh)) + top  # [n, gh]
        cols = torch.where(flip[:, 1:], gw - 1 - torch.arange(gw), torch.arange(gw)) + left  # [n, gw]
        idx, rows, cols = (self._to_device(t) for t in (idx, rows, cols))
        return self.patterns[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # [n, gh, gw]

    def _block2x2(self, n):
        """Aligned 2x2 blocks in random order; ties inside a block are broken at random."""
        gh, gw = self.grid
        coarse = torch.rand(n, gh // 2, gw // 2, generator=self.rng)
        rank = coarse.flatten(1).argsort(1).argsort(1).view(n, gh // 2, gw // 2).double()
        rank = rank.repeat_interleave(2, 1).repeat_interleave(2, 2)  # [n, gh, gw]
        return (rank + torch.rand(n, gh, gw, generator=self.rng, dtype=torch.float64)).flatten(1).float()

    def _beit_blocks(self, n, min_patches=4, aspect=0.3, attempts=10):
        """BEiT's block-wise masking: add random rectangles until num_mask patches are covered. Covered
        patches score in [1, 2), the rest in [0, 1), so the exact count is then taken by the model's top-k."""
        gh, gw = self.grid
        num_mask = self.num_patches - num_keep(self.num_patches, self.mask_ratio)
        out = torch.rand(n, gh, gw, generator=self.rng, dtype=torch.float64)
        log_aspect = (math.log(aspect), math.log(1 / aspect))
        for s in range(n):
            covered = torch.zeros(gh, gw, dtype=torch.bool)
            count = 0
            while count < num_mask:
                left_to_mask, added = num_mask - count, 0
                draws = torch.rand(attempts, 4, generator=self.rng, dtype=torch.float64).tolist()
                for u_area, u_aspect, u_top, u_left in draws:
                    area = min_patches + u_area * max(left_to_mask - min_patches, 0)
                    ar = math.exp(log_aspect[0] + u_aspect * (log_aspect[1] - log_aspect[0]))
                    h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                    if 0 < h < gh and 0 < w < gw:
                        top, left = int(u_top * (gh - h + 1)), int(u_left * (gw - w + 1))
                        new = h * w - int(covered[top:top + h, left:left + w].sum())
                        if 0 < new <= left_to_mask:
                            covered[top:top + h, left:left + w] = True
                            added = new
                            break
                if added == 0:
                    break
                count += added
            out[s] += covered.double()
        return out.flatten(1).float()

    def state_dict(self):
        return {'mask_type': self.mask_type, 'rng_state': self.rng.get_state()}

    def load_state_dict(self, state):
        self.rng.set_state(state['rng_state'])


def masks_from_noise(noise, mask_ratio):
    """Binary masks [N, L] (1 = removed) that a model keeping the lowest scores would use."""
    n, length = noise.shape
    ids_keep = noise.argsort(dim=1)[:, :num_keep(length, mask_ratio)]
    mask = torch.ones(n, length, device=noise.device)
    mask.scatter_(1, ids_keep, 0)
    return mask


def _draw_figure(out, grid=14, mask_ratio=0.75, num_examples=3, seed=0):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    types = [t for t in MASK_TYPES]
    fig, axes = plt.subplots(len(types), num_examples + 2, figsize=(2 * (num_examples + 2), 2 * len(types)))
    for r, kind in enumerate(types):
        gen = MaskGenerator(kind, grid, mask_ratio, seed=seed)
        masks = masks_from_noise(gen(num_examples), mask_ratio).view(-1, grid, grid)
        for c in range(num_examples):
            axes[r, c].imshow((1 - masks[c]).numpy(), cmap='gray', vmin=0, vmax=1)  # white = visible
        ax_p, ax_s = axes[r, num_examples], axes[r, num_examples + 1]
        if gen.patterns is not None:
            ax_p.imshow(gen.patterns[0].cpu().numpy(), cmap='viridis')
            spec = radial_power_spectrum(gen.patterns, 12)
            freqs = (torch.arange(12) + 0.5) / 24
            ax_s.plot(freqs.numpy(), (spec / spec.max()).numpy(), color=kind if kind != 'white' else 'gray')
            ax_s.set_ylim(0, 1.05)
            ax_s.set_xlabel('cycles / patch', fontsize=7)
        else:
            ax_p.axis('off')
            ax_s.axis('off')
        axes[r, 0].set_ylabel(kind)
        for ax in axes[r, :num_examples + 1]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, num_examples].set_title('pattern')
    axes[0, num_examples + 1].set_title('power spectrum')
    fig.suptitle(f'masks on a {grid}x{grid} grid at ratio {mask_ratio} (white = visible)')
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f'wrote {out}')


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser('Draw example masks, patterns and power spectra for every mask type')
    parser.add_argument('--out', default='masks.png')
    parser.add_argument('--grid', default=14, type=int)
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--save_patterns', default='', help='also save a bank of this color: COLOR:PATH.npz')
    a = parser.parse_args()
    _draw_figure(a.out, a.grid, a.mask_ratio)
    if a.save_patterns:
        color, path = a.save_patterns.split(':', 1)
        save_patterns(path, MaskGenerator(color, a.grid).patterns)
        print(f'wrote {path}')
