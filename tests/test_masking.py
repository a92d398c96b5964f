import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

import masking
from masking import MaskGenerator, masks_from_noise

GRIDS = [(14, 14), (8, 8), (4, 4), (6, 10)]


@pytest.mark.parametrize('kind', masking.MASK_TYPES)
@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('ratio', [0.5, 0.65, 0.75, 0.9])
def test_exact_counts(kind, grid, ratio):
    L = grid[0] * grid[1]
    noise = MaskGenerator(kind, grid, ratio, seed=0)(16)
    assert noise.shape == (16, L)
    mask = masks_from_noise(noise, ratio)
    assert (mask.sum(1) == L - int(L * (1 - ratio))).all()


@pytest.mark.parametrize('kind', masking.MASK_TYPES)
def test_seeded_and_varied(kind):
    if kind == 'random':
        torch.manual_seed(3)
    a = MaskGenerator(kind, 14, 0.75, seed=3)(8)
    if kind == 'random':
        torch.manual_seed(3)
    b = MaskGenerator(kind, 14, 0.75, seed=3)(8)
    assert torch.equal(a, b)
    masks = masks_from_noise(a, 0.75)
    assert len({tuple(m.tolist()) for m in masks}) == 8  # every sample its own mask


@pytest.mark.parametrize('kind', ['red', 'block', 'block2x2', 'green'])
def test_state_dict_restores_the_stream(kind):
    g1 = MaskGenerator(kind, 8, 0.75, seed=1)
    g1(4)
    state = g1.state_dict()
    expected = g1(4)
    g2 = MaskGenerator(kind, 8, 0.75, seed=1)
    g2.load_state_dict(state)
    assert torch.equal(g2(4), expected)


def test_random_type_is_mae_draw():
    torch.manual_seed(7)
    a = MaskGenerator('random', 14, 0.75)(4)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(4, 196))


def spectrum(color, n=512, size=32):
    p = masking.colored_noise_patterns(color, n, size, torch.Generator().manual_seed(0))
    s = masking.radial_power_spectrum(p, 8)
    return (s / s.max()).tolist()


def test_spectra_have_their_colors():
    red, blue, green, purple, white = (spectrum(c) for c in ('red', 'blue', 'green', 'purple', 'white'))
    assert all(a > b for a, b in zip(red, red[1:])) and red[-1] < 0.05 * red[0]  # decreasing
    assert all(a < b for a, b in zip(blue, blue[1:])) and blue[0] < 0.05 * blue[-1]  # increasing
    peak = int(np.argmax(green))
    assert 2 <= peak <= 5 and green[0] < 0.3 and green[-1] < 0.3  # peaked in the middle band
    dip = int(np.argmin(purple))
    assert 2 <= dip <= 5 and purple[0] > 2 * purple[dip] and purple[-1] > 2 * purple[dip]  # dipped there
    assert max(white) / min(white) < 1.2  # flat
    for c in masking.COLORS:  # standardized
        p = masking.colored_noise_patterns(c, 4, 32)
        assert torch.allclose(p.mean((1, 2)), torch.zeros(4), atol=1e-5)
        assert torch.allclose(p.std((1, 2)), torch.ones(4), atol=1e-4)


def visible_stats(kind, n=200, grid=14, ratio=0.75):
    """Mean size of 4-connected clusters of visible patches, and mean number of adjacent visible pairs."""
    vis = (1 - masks_from_noise(MaskGenerator(kind, grid, ratio, seed=0)(n), ratio)).view(n, grid, grid).numpy()
    sizes, pairs = [], []
    for v in vis:
        pairs.append((v[1:] * v[:-1]).sum() + (v[:, 1:] * v[:, :-1]).sum())
        seen = np.zeros_like(v, dtype=bool)
        for i, j in zip(*np.nonzero(v)):
            if seen[i, j]:
                continue
            stack, size = [(i, j)], 0
            seen[i, j] = True
            while stack:
                a, b = stack.pop()
                size += 1
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < grid and 0 <= d < grid and v[c, d] and not seen[c, d]:
                        seen[c, d] = True
                        stack.append((c, d))
            sizes.append(size)
    return float(np.mean(sizes)), float(np.mean(pairs))


def test_mask_structure_follows_the_color():
    torch.manual_seed(0)
    rand_cluster, rand_pairs = visible_stats('random')
    red_cluster, _ = visible_stats('red')
    _, blue_pairs = visible_stats('blue')
    assert red_cluster > 2 * rand_cluster
    assert blue_pairs < 0.85 * rand_pairs  # measured: about 0.76x
    block2_cluster, _ = visible_stats('block2x2')
    assert block2_cluster >= 4 * 0.9  # whole 2x2 blocks stay visible


def test_pattern_file_roundtrip_and_topk(tmp_path):
    pat = np.zeros((1, 4, 4), dtype=np.float32)
    pat[0, 1:3, 1:3] = [[5, 6], [7, 8]]  # the centre is highest: flip-invariant as a set
    path = tmp_path / 'green_noise.npz'
    np.savez(path, pat)
    gen = MaskGenerator('green', 4, 0.75, seed=0, patterns=masking.load_patterns(str(path)))
    mask = masks_from_noise(gen(6), 0.75).view(6, 4, 4)
    expected = torch.ones(4, 4)
    expected[1:3, 1:3] = 0
    assert all(torch.equal(m, expected) for m in mask)
    # an asymmetric pattern: the kept patches are the top-k of one of its four flips
    pat = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.savez(path, patterns=pat)
    gen = MaskGenerator('red', 4, 0.5, seed=0, patterns=masking.load_patterns(str(path)))
    flips = [torch.from_numpy(f.copy()) for f in (pat[0], pat[0][::-1], pat[0][:, ::-1], pat[0][::-1, ::-1])]
    options = [(f < 8).float() for f in flips]  # top 8 visible
    for m in masks_from_noise(gen(8), 0.5).view(8, 4, 4):
        assert any(torch.equal(m, o) for o in options)
    out = tmp_path / 'bank.npz'
    bank = MaskGenerator('green', 14, seed=0).patterns
    masking.save_patterns(str(out), bank)
    assert torch.equal(masking.load_patterns(str(out)), bank)


def test_schedule():
    sched = masking.parse_mask_schedule('250:red, 200:blue,275:purple')
    assert sched == [(200, 'blue'), (250, 'red'), (275, 'purple')]
    assert [masking.mask_type_at(e, 'green', sched) for e in (0, 199, 200, 260, 300)] == \
        ['green', 'green', 'blue', 'red', 'purple']
    with pytest.raises(ValueError):
        masking.parse_mask_schedule('x:red')


def test_figure(tmp_path):
    out = tmp_path / 'masks.png'
    masking._draw_figure(str(out), grid=8)
    assert out.stat().st_size > 10_000


# --- block (BEiT) masking: the vectorized generator against a per-sample reference ---

def beit_reference(n, grid, num_mask, rng, min_patches=4, aspect=0.3, attempts=10):
    """BEiT's MaskingGenerator one sample at a time (its area rule as masking.py has it: uniform in
    [min_patches, max(min_patches, left_to_mask)]) -> covered [n, gh, gw] bool, before the top-up."""
    gh, gw = grid
    lo, hi = math.log(aspect), math.log(1 / aspect)
    out = np.zeros((n, gh, gw), dtype=bool)
    for covered in out:
        count = 0
        while count < num_mask:
            left = num_mask - count
            for _ in range(attempts):
                area = min_patches + rng.random() * max(left - min_patches, 0)
                ar = math.exp(rng.uniform(lo, hi))
                h, w = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
                if 0 < h < gh and 0 < w < gw:
                    top, lft = rng.integers(gh - h + 1), rng.integers(gw - w + 1)
                    new = h * w - int(covered[top:top + h, lft:lft + w].sum())
                    if 0 < new <= left:
                        covered[top:top + h, lft:lft + w] = True
                        count += new
                        break
            else:  # no attempt fitted: BEiT stops here
                break
    return out


def block_covered(gen, n, batch=64, **kw):
    """The generator's covered patches (score >= 1) for n samples drawn in batches, [n, gh, gw] bool."""
    noise = torch.cat([gen._beit_blocks(min(batch, n - i), **kw) for i in range(0, n, batch)])
    return (noise >= 1).view(n, *gen.grid).numpy()


def region_stats(covered, num_mask):
    """Per-sample statistics of covered sets [n, gh, gw]: 4-connected regions (count, the largest, bounding
    boxes taller / wider than / as wide as high), adjacent pairs along each axis, patches on the border."""
    n, gh, gw = covered.shape
    big = gh * gw
    label = np.where(covered, np.arange(big).reshape(gh, gw), big)
    while True:  # every patch takes the smallest index of its region
        p = np.pad(label, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        nxt = np.where(covered, np.minimum.reduce([label, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2],
                                                   p[:, 1:-1, 2:]]), big)
        if np.array_equal(nxt, label):
            break
        label = nxt
    s, r, c = np.nonzero(covered)
    regions, inv = np.unique(s * big + label[s, r, c], return_inverse=True)
    box = np.full((4, len(regions)), big)
    np.minimum.at(box[0], inv, r)
    np.minimum.at(box[1], inv, c)
    box[2:] = -1
    np.maximum.at(box[2], inv, r)
    np.maximum.at(box[3], inv, c)
    bh, bw, owner = box[2] - box[0], box[3] - box[1], regions // big
    size = np.bincount(inv)
    largest = np.zeros(n)
    np.maximum.at(largest, owner, size)
    count = covered.sum((1, 2))
    per = lambda sel: np.bincount(owner[sel], minlength=n)  # noqa: E731
    ring = covered.copy()
    ring[:, 1:-1, 1:-1] = False
    return {'covered': count, 'full': count == num_mask, 'regions': np.bincount(owner, minlength=n),
            'largest': largest, 'tall': per(bh > bw), 'wide': per(bh < bw), 'square': per(bh == bw),
            'pairs_v': (covered[:, 1:] & covered[:, :-1]).sum((1, 2)),
            'pairs_h': (covered[:, :, 1:] & covered[:, :, :-1]).sum((1, 2)), 'border': ring.sum((1, 2))}


def z_scores(a, b):
    """|difference of means| / its standard error, per statistic of two independent samples."""
    return {k: abs(a[k].mean() - b[k].mean()) / max(math.sqrt(a[k].var(ddof=1) / len(a[k]) +
                                                              b[k].var(ddof=1) / len(b[k])), 1e-12) for k in a}


BLOCK_CASES = [((14, 14), 0.75), ((14, 14), 0.25), ((8, 8), 0.5), ((6, 10), 0.6)]
NUM_STATS = 10  # region_stats' statistics
# two-sided, Bonferroni over every statistic of every case: a family-wise false-alarm rate of 1e-3
Z_MAX = NormalDist().inv_cdf(1 - 1e-3 / (2 * NUM_STATS * len(BLOCK_CASES)))


@pytest.mark.parametrize('grid,ratio', BLOCK_CASES)
def test_block_distribution_matches_per_sample_reference(grid, ratio):
    n = 3000
    gen = MaskGenerator('block', grid, ratio, seed=11)
    num_mask = gen.num_patches - masking.num_keep(gen.num_patches, ratio)
    ref = region_stats(beit_reference(n, grid, num_mask, np.random.default_rng(12)), num_mask)
    ours = region_stats(block_covered(gen, n), num_mask)
    z = z_scores(ours, ref)
    assert len(z) == NUM_STATS
    assert max(z.values()) < Z_MAX, {k: round(v, 2) for k, v in z.items()}


def test_block_statistics_tell_other_shapes_apart():
    """The comparison above has the power to see a wrong aspect range or minimum block size."""
    n, grid, ratio = 3000, (14, 14), 0.75
    num_mask = 196 - masking.num_keep(196, ratio)
    ref = region_stats(beit_reference(n, grid, num_mask, np.random.default_rng(12)), num_mask)
    for kw in ({'aspect': 0.6}, {'min_patches': 9}):
        other = region_stats(block_covered(MaskGenerator('block', grid, ratio, seed=11), n, **kw), num_mask)
        assert max(z_scores(other, ref).values()) > Z_MAX, kw


@pytest.mark.parametrize('grid', [(14, 14), (8, 8), (4, 4), (6, 10), (16, 16), (7, 3)])
@pytest.mark.parametrize('ratio', [0.0, 0.3, 0.75, 0.9, 1.0])
@pytest.mark.parametrize('batch', [1, 5, 64])
def test_block_covers_at_most_num_mask_and_topk_masks_exactly_it(grid, ratio, batch):
    gen = MaskGenerator('block', grid, ratio, seed=batch)
    L = gen.num_patches
    num_mask = L - masking.num_keep(L, ratio)
    noise = gen(batch)
    covered = noise >= 1
    assert noise.dtype == torch.float32 and noise.shape == (batch, L) and (noise >= 0).all()
    assert (covered.sum(1) <= num_mask).all()
    mask = masks_from_noise(noise, ratio).bool()
    assert (mask.sum(1) == num_mask).all()
    assert not (covered & ~mask).any()  # every block patch is masked; the top-up is random


def test_block_seeded_and_resumable(tmp_path):
    a, b = MaskGenerator('block', 14, 0.75, seed=5), MaskGenerator('block', 14, 0.75, seed=5)
    first = [a(n) for n in (64, 3, 17)]
    assert all(torch.equal(x, b(len(x))) for x in first)
    assert not torch.equal(MaskGenerator('block', 14, 0.75, seed=6)(64), first[0])
    torch.save(a.state_dict(), tmp_path / 'gen.pth')
    expected = [a(n) for n in (64, 1, 64)]
    c = MaskGenerator('block', 14, 0.75, seed=0)
    c.load_state_dict(torch.load(tmp_path / 'gen.pth'))
    assert all(torch.equal(x, c(len(x))) for x in expected)


@pytest.mark.parametrize('gh,gw', [(14, 14), (5, 9), (3, 64), (7, 1)])
def test_bitboard_rectangles_and_popcount(gh, gw, monkeypatch):
    board = masking._Bitboard(gh, gw)
    g = np.random.default_rng(0)
    h, w = g.integers(0, gh + 1, 200), g.integers(0, gw + 1, 200)
    top, lft = (g.random(200) * (gh + 1 - h)).astype(int), (g.random(200) * (gw + 1 - w)).astype(int)
    bits = board.rect(h, w, top, lft)  # [words, 200]
    expected = np.zeros((200, gh, gw), dtype=np.int64)
    for i in range(200):
        expected[i, top[i]:top[i] + h[i], lft[i]:lft[i] + w[i]] = 1
    assert np.array_equal(board.unpack(bits), expected)
    assert np.array_equal(masking._popcount(bits).sum(0), h * w)
    monkeypatch.delattr(np, 'bitwise_count', raising=False)  # numpy < 2.0: the byte table
    assert np.array_equal(masking._popcount(bits).sum(0), h * w)
