"""k-NN, reconstruction figures and attention rollout."""
import os

import pytest
import torch
from PIL import Image

import main_knn
import main_visualize
import masking
import models_mae
from conftest import torchrun
from util.rollout import attention_maps, rollout


def test_knn_on_a_known_answer():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    train_y = torch.arange(3).repeat_interleave(20)
    train_f = torch.nn.functional.normalize(centers[train_y] + 0.1 * torch.randn(60, 16, generator=g), dim=1)
    test_y = torch.tensor([0, 1, 2, 2, 1])
    test_f = torch.nn.functional.normalize(centers[test_y] + 0.1 * torch.randn(5, 16, generator=g), dim=1)
    res = main_knn.knn_classify(train_f, train_y, test_f, test_y, [1, 10, 20])
    assert all(r == (100.0, 100.0) for r in res.values())
    # a weighted vote: one very close neighbour of class 1 against two far ones of class 0 (T = 0.07)
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    test_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    res = main_knn.knn_classify(train_f, torch.tensor([1, 0, 0]), test_f, torch.tensor([1]), [3], num_classes=2)
    assert res[3][0] == 100.0


KNN = ['--model', 'vit_pico_patch4', '--input_size', 32, '--subset', 1000, '--val_subset', 300, '--cache_data',
       '--num_workers', 0, '--ks', 10, 20, 200, '--batch_size', 100]


def test_knn_untrained_real_data_reproducible_and_distributed(data_path, tmp_path):
    """Two processes (gloo): features gathered as tensors over equal shards, the sampler's padding dropped (1001
    and 301 images: one padded sample each), the search split over the ranks, the probe trained on rank 0:
    the same table as one process (with 301 val images one sample is 0.33 %, visible at 2 decimals)."""
    one, two = tmp_path / 'one.md', tmp_path / 'two.md'
    odd = ['--subset', 1001, '--val_subset', 301, '--batch_size', 64, '--probe_epochs', 2]

    def knn(*extra):
        return main_knn.main(main_knn.get_args_parser().parse_args([str(a) for a in [*KNN, '--data_path', data_path,
                                                                                     *odd, *extra]]))
    rows = knn('--output', one)
    rows_again = knn()
    res = rows[0][1]
    assert 10 <= res[20][0] <= 50, res
    assert rows_again[0][1] == res
    torchrun('main_knn.py', [*KNN, '--data_path', data_path, *odd, '--output', two])
    assert one.read_text() == two.read_text()


def test_raw_pixel_floor(data_path):
    x = torch.rand(2, 3, 32, 32)
    f = main_knn.raw_pixels(x, 16)
    assert f.shape == (2, 3 * 16 * 16)
    assert torch.allclose(f.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(f[0, 0] + x[0].mean(), x[0, 0, :2, :2].mean())  # 2x2 average, then centred
    args = main_knn.get_args_parser().parse_args([str(a) for a in [*KNN, '--data_path', data_path, '--model', 'pixels',
                                                                   '--pixel_size', 16, '--ks', 20]])
    (name, res), = main_knn.main(args)
    assert 15 <= res[20][0] <= 60, res  # chance is 10%


def test_reconstruction_figure_beats_mean_colour(pico_pretrained, data_path, tmp_path):
    out = tmp_path / 'recon.png'
    args = main_visualize.get_args_parser().parse_args(
        ['--checkpoint', str(pico_pretrained / 'checkpoint.pth'), '--out', str(out), '--num_images', '32',
         '--data_path', data_path])
    panels = main_visualize.main(args)
    img = Image.open(out)
    assert img.size[0] == 800 and abs(img.size[1] - 100 * (2 * 32 + 0.6)) <= 2  # 4 panels wide, a row per image
    model = models_mae.mae_vit_pico_patch4()
    hidden = panels['removed'].bool()
    orig, rec = model.patchify(panels['original']), model.patchify(panels['reconstruction + visible'])
    vis = (~hidden).float()
    per_pixel = orig.view(32, 64, 16, 3)
    mean_colour = (per_pixel * vis[..., None, None]).sum((1, 2)) / (vis.sum(1)[:, None] * 16)
    fill = mean_colour[:, None, None, :].expand(32, 64, 16, 3).reshape(32, 64, 48)
    err_rec = ((rec - orig) ** 2)[hidden].mean()
    err_fill = ((fill - orig) ** 2)[hidden].mean()
    assert err_rec < 0.98 * err_fill, (err_rec, err_fill)  # measured: 0.0436 vs 0.0460
    assert torch.equal(rec[~hidden], orig[~hidden])  # visible patches pasted back


def test_reconstruction_with_partial_prediction_and_norm_pix(tmp_path, data_path):
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4(cross_mae=True, weight_fm=True, use_input=True, norm_pix_loss=True)
    path = tmp_path / 'cross.pth'
    torch.save({'model': model.state_dict(), 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 32,
                                                      'norm_pix_loss': True, 'cross_mae': True, 'weight_fm': True,
                                                      'use_input': True, 'mask_ratio': 0.75, 'kept_mask_ratio': 0.25}}, path)
    for unnorm in ('visible', 'own'):
        out = tmp_path / f'{unnorm}.png'
        args = main_visualize.get_args_parser().parse_args(['--checkpoint', str(path), '--out', str(out), '--num_images',
                                                             '2', '--data_path', data_path, '--unnorm', unnorm,
                                                             '--mask_type', 'green'])
        panels = main_visualize.main(args)
        assert (panels['predicted'].sum(1) == 64 - 16 - 32).all()
        assert out.stat().st_size > 5000


def test_rollout_maps(pico_pretrained, data_path, tmp_path):
    import models_vit
    from util.pretrained import load_encoder
    model = models_vit.vit_pico_patch4(num_classes=0, global_pool=False)
    load_encoder(model, str(pico_pretrained / 'checkpoint.pth'))
    x = torch.randn(3, 3, 32, 32)
    maps = attention_maps(model.eval(), x)
    assert len(maps) == 4 and maps[0].shape == (3, 3, 65, 65)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 3, 65))
    for fuse in ('mean', 'max', 'min'):
        cls_map, layers = rollout(maps, fuse, discard_ratio=0.9)
        assert cls_map.shape == (3, 64)
        assert cls_map.min() >= 0 and cls_map.max() <= 1 and torch.allclose(cls_map.amax(1), torch.ones(3))
        for a in layers:
            assert torch.allclose(a.sum(-1), torch.ones(3, 65), atol=1e-6)
    out = tmp_path / 'rollout.png'
    main_visualize.main(main_visualize.get_args_parser().parse_args(
        ['--rollout', '--checkpoint', str(pico_pretrained / 'checkpoint.pth'), '--out', str(out), '--num_images', '2',
         '--data_path', data_path]))
    assert out.stat().st_size > 5000


def test_knn_over_a_folder_of_checkpoints_writes_a_table(pico_pretrained, data_path, tmp_path):
    out = tmp_path / 'knn.md'
    args = main_knn.get_args_parser().parse_args([str(a) for a in [
        '--model', 'vit_pico_patch4', '--input_size', 32, '--subset', 200, '--val_subset', 100, '--cache_data',
        '--num_workers', 0, '--ks', 10, 20, '--checkpoint', pico_pretrained, '--output', out, '--probe_epochs', 5,
        '--data_path', data_path]])
    rows = main_knn.main(args)
    names = sorted(p.name for p in pico_pretrained.glob('*.pth'))
    assert sorted(os.path.basename(p) for p, _ in rows) == names
    lines = out.read_text().strip().splitlines()
    assert len(lines) == 2 + len(names) and 'linear probe top1' in lines[0]


# ---------------------------------------------------------------- review #21: figure RNG, k-NN on the device

class ImageRecorder:
    def __init__(self):
        self.images = []

    def add_image(self, tag, img, step):
        self.images.append((tag, img.clone(), step))

    add_images = add_image


RESEEDS = [(torch, 'manual_seed'), (torch.random, 'manual_seed'), (torch, 'seed'), (torch.random, 'seed'),
           (torch.cuda, 'manual_seed'), (torch.cuda, 'manual_seed_all'), (torch.cuda, 'seed'), (torch.cuda, 'seed_all')]


@pytest.mark.parametrize('mask_type', ['random', 'block2x2'])
def test_tensorboard_figure_leaves_the_global_rng_alone_and_is_deterministic(monkeypatch, mask_type):
    """The figure used to call torch.manual_seed inside a CPU-only fork_rng: that re-seeds every CUDA generator
    (the `random` masks of rank 0 then restarted from --seed after each figure). Without a GPU the CUDA state
    cannot be read, so this checks that no generator of any device is re-seeded (the calls, and torch.cuda's
    queue of seeds for a CUDA not yet initialised), that the CPU generator is exactly as it was, and that the
    figure is a function of its seed; tests/test_cuda.py reads the CUDA generator itself."""
    from util.visualize import log_to_tensorboard
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4()
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask_gen = masking.MaskGenerator(mask_type, 8, 0.75, seed=5)
    tracker = getattr(torch.cuda, '_lazy_seed_tracker', None)
    queued = list(tracker.get_calls()) if tracker is not None else None
    calls = []
    for mod, fn in RESEEDS:
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _f=fn, _o=orig, **k: (calls.append(_f), _o(*a, **k))[1])
    state = torch.get_rng_state()
    expected_next = torch.rand(5)
    torch.set_rng_state(state)
    writers = [ImageRecorder(), ImageRecorder()]
    for w in writers:
        log_to_tensorboard(w, model, imgs, mask_gen, 0.75, None, epoch=3, seed=7)
    assert calls == []
    if tracker is not None:
        assert tracker.get_calls() == queued
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected_next)  # the default generator continues where it was
    (a, b) = writers
    assert [t for t, _, _ in a.images] == ['reconstruction', 'masks (white = visible)']
    assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a.images, b.images))
    # the masks are those of a fresh stream seeded with the figure's seed (what the figure drew before the fix)
    fresh = (torch.rand(2, 64, generator=torch.Generator().manual_seed(7)) if mask_type == 'random'
             else masking.MaskGenerator(mask_type, 8, 0.75, seed=7)(2))
    visible = 1 - masking.masks_from_noise(fresh, 0.75)
    assert torch.equal(a.images[1][1], visible.view(-1, 1, 8, 8))


def knn_reference(train_f, train_y, test_f, test_y, ks, temperature, num_classes):
    """All similarities at once (no chunks) -> {k: (top1 %, top5 %)}."""
    kmax = min(max(ks), len(train_f))
    sim, idx = (test_f @ train_f.T).topk(kmax, dim=1)
    w, nb = (sim / temperature).exp(), train_y[idx]
    out = {}
    for k in ks:
        kk = min(k, kmax)
        scores = torch.zeros(len(test_f), num_classes).scatter_add_(1, nb[:, :kk], w[:, :kk])
        top = scores.topk(min(5, num_classes), dim=1).indices
        out[k] = (100. * (top[:, 0] == test_y).sum().item() / len(test_f),
                  100. * (top == test_y[:, None]).any(1).sum().item() / len(test_f))
    return out


def test_knn_in_chunks_and_shards_equals_one_direct_computation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 16, generator=g)
    train_y, test_y = torch.randint(10, (500,), generator=g), torch.randint(10, (37,), generator=g)
    norm = torch.nn.functional.normalize
    train_f = norm(centers[train_y] + 1.5 * torch.randn(500, 16, generator=g), dim=1)
    test_f = norm(centers[test_y] + 1.5 * torch.randn(37, 16, generator=g), dim=1)
    ks = [1, 5, 20, 600]  # 600 > 500 train samples: all of them
    ref = knn_reference(train_f, train_y, test_f, test_y, ks, 0.07, 10)
    assert 20 < ref[20][0] < 100  # neither trivial nor chance
    with HostReads(monkeypatch, 'main_knn.py') as reads:
        res = main_knn.knn_classify(train_f, train_y, test_f, test_y, ks, 0.07, 10, chunk=8)  # 5 chunks, the last of 5
    assert res == ref  # the same counts: each test row's similarities do not depend on the chunk
    assert reads.count <= 1, reads.sites  # one read of all counts, not one per chunk and k
    shards = [main_knn.knn_counts(train_f, train_y, test_f, test_y, ks, 0.07, 10, chunk=8, rank=r, world_size=3)
              for r in range(3)]
    assert torch.equal(sum(shards), main_knn.knn_counts(train_f, train_y, test_f, test_y, ks, 0.07, 10, chunk=8))


class HostReads:
    """Counts host reads of tensors (.item(), .tolist(), .cpu(), .numpy(), float()/bool()/int()) made from one
    file while active (as tests/test_sync.py does; each of them waits for the device on CUDA)."""
    READS = ('item', 'tolist', 'cpu', 'numpy', '__float__', '__bool__', '__int__', '__index__')

    def __init__(self, monkeypatch, filename):
        import collections
        self.count, self.sites, self.monkeypatch, self.filename = 0, collections.Counter(), monkeypatch, filename

    def __enter__(self):
        import sys
        for name in self.READS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                f = sys._getframe(1)
                if f.f_code.co_filename.endswith(self.filename):
                    self.count += 1
                    self.sites[f'{_name} at line {f.f_lineno}'] += 1
                return _orig(t, *a, **k)
            self.monkeypatch.setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


class Shapes(torch.utils.data.Dataset):
    classes = list(range(4))

    def __len__(self):
        return 45

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), i % 4


def test_knn_extraction_reads_nothing_on_the_host(monkeypatch):
    """No .cpu() (or other host read) per batch in the extraction loop: the features stay on the device."""
    args = main_knn.get_args_parser().parse_args(['--batch_size', '8', '--num_workers', '0', '--device', 'cpu'])
    args.__dict__.update(world_size=1, rank=0, distributed=False, device=torch.device('cpu'), amp='none')
    embed = lambda x: x.flatten(1)[:, :6] * torch.arange(1., 7.)  # noqa: E731
    with HostReads(monkeypatch, 'main_knn.py') as reads:
        feats, labels = main_knn.extract_features(embed, Shapes(), args)  # 6 batches
    assert reads.count == 0, reads.sites
    i = torch.arange(45.)
    expected = torch.nn.functional.normalize(i[:, None] * torch.arange(1., 7.), dim=1)
    assert torch.equal(feats, expected) and torch.equal(labels, torch.arange(45) % 4)
