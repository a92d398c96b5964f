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
