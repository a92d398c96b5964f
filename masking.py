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
- block: BEiT-style block-wise masking (rectangles of >= 4 patches, aspect ratio in [0.3, 1/0.3]), vectorized
  over the batch; grids up to 64 patches wide.
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


class _Bitboard:
    """Patch sets on a gh x gw grid as uint64 words of `rows` grid rows each (gw bits a row, gw <= 64), so that
    a rectangle's overlap with a set is a popcount. Words come first in every array: numpy sums over a leading
    axis of a few words several times faster than over a trailing one."""

    def __init__(self, gh, gw):
        if gw > 64:
            raise ValueError(f'block masking needs a grid at most 64 patches wide, got {gw}')
        self.gh, self.gw, self.rows = gh, gw, 64 // gw
        self.words = -(-gh // self.rows)
        # col_bits[w * (gw + 1) + left]: columns [left, left + w) of one row; row_bits[k, h * (gh + 1) + top]: bit
        # gw * j of word k for each grid row k * rows + j in [top, top + h). Their product is the rectangle.
        self.col_bits = np.array([((1 << w) - 1) << left if w + left <= gw else 0
                                  for w in range(gw + 1) for left in range(gw + 1)], dtype=np.uint64)
        self.row_bits = np.array([[sum(1 << (gw * j) for j in range(self.rows) if top <= k * self.rows + j < top + h)
                                   for h in range(gh + 1) for top in range(gh + 1)] for k in range(self.words)],
                                 dtype=np.uint64)

    def rect(self, h, w, top, left):
        """Rectangles (int arrays of one shape; h = 0 or w = 0 is empty) -> their bits [words, ...]."""
        cols = np.take(self.col_bits, w * (self.gw + 1) + left)
        return cols * np.take(self.row_bits, h * (self.gh + 1) + top, axis=1)  # no carries: disjoint bits

    def unpack(self, words):
        """[words, n] -> [n, gh, gw] uint8 0/1."""
        shifts = (self.gw * np.arange(self.rows)).astype(np.uint64)
        rows = (words.T[..., None] >> shifts) & np.uint64((1 << self.gw) - 1)  # [n, words, rows]
        rows = rows.reshape(words.shape[1], -1)[:, :self.gh]
        return ((rows[..., None] >> np.arange(self.gw, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)


_POP8 = np.array([bin(i).count('1') for i in range(256)], dtype=np.int64)


def _popcount(x):
    """Set bits per uint64 (np.bitwise_count from numpy 2.0, else a byte table)."""
    if hasattr(np, 'bitwise_count'):
        return np.bitwise_count(x)
    return _POP8[x[..., None].view(np.uint8)].sum(-1)


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
        self._board = _Bitboard(gh, gw) if mask_type == 'block' else None

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
        """BEiT's block-wise masking, all samples at once. In each round every sample still short of num_mask
        draws `attempts` rectangles (area uniform in [min_patches, max(min_patches, left_to_mask)], log aspect
        uniform in [log aspect, -log aspect], position uniform) and adds the first that covers 1..left_to_mask new
        patches. Coverage changes only on success, so the first valid of the round's draws is what BEiT's
        sequential per-sample loop would take. A sample stops at num_mask or after a round that adds nothing.
        Covered patches score 1 + u, the rest u (u uniform in [0, 1)), so the model's top-k masks every covered
        patch and tops the count up to exactly num_mask with random others. A round adds >= 1 patch to each sample
        that goes on, so there are at most num_mask + 1 (about 18 for 64 samples on 14x14 at 0.75). They run in
        numpy: each is a few dozen ops on arrays of [words, samples, attempts], where numpy's per-op overhead is a
        fraction of torch's."""
        gh, gw = self.grid
        num_mask = self.num_patches - num_keep(self.num_patches, self.mask_ratio)
        # numpy's PCG64 draws about twice as fast as torch's CPU generator; one seed from self.rng per call keeps
        # the stream reproducible and resumable from state_dict()
        rng = np.random.Generator(np.random.PCG64(int(torch.randint(2 ** 63 - 1, (), generator=self.rng))))
        out = rng.random((n, gh, gw), dtype=np.float32)  # below 1, so 1 + u stays above every u
        board, lo, hi = self._board, 0.5 * math.log(aspect), -0.5 * math.log(aspect)  # log sqrt(aspect ratio)
        cover = np.zeros((board.words, n), dtype=np.uint64)
        left = np.full(n, num_mask)  # patches still to cover; 0 once a sample has stopped
        samples = np.arange(n)
        while left.any():  # stopped samples stay in the arrays: compacting would cost about the ops it saves
            u = rng.random((4, n, attempts))
            root_area = np.sqrt(min_patches + u[0] * np.maximum(left - min_patches, 0)[:, None])
            root_ar = np.exp(lo + u[1] * (hi - lo))
            h, w = np.rint(root_area * root_ar).astype(np.int64), np.rint(root_area / root_ar).astype(np.int64)
            ok = (h < gh) & (w < gw)  # h or w = 0: an empty rectangle, which adds nothing
            h, w = np.minimum(h, gh - 1), np.minimum(w, gw - 1)
            top, lft = (u[2] * (gh + 1 - h)).astype(np.int64), (u[3] * (gw + 1 - w)).astype(np.int64)
            rect = board.rect(h, w, top, lft)  # [words, n, attempts]
            new = h * w - _popcount(rect & cover[..., None]).sum(0, dtype=np.int64)
            valid = ok & (new > 0) & (new <= left[:, None])
            added = valid.any(1)
            first = valid.argmax(1)  # the first valid attempt
            cover |= rect[:, samples, first] * added
            left = np.where(added, left - new[samples, first], 0)
        return torch.from_numpy(out + board.unpack(cover)).flatten(1)

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
