"""k-NN, reconstruction figures and attention rollout."""
import os

import torch
from PIL import Image

import main_knn
import main_visualize
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
    one, two = tmp_path / 'one.md', tmp_path / 'two.md'
    def knn(*extra):
        return main_knn.main(main_knn.get_args_parser().parse_args([str(a) for a in [*KNN, '--data_path', data_path, *extra]]))
    rows = knn('--output', one)
    rows_again = knn()
    res = rows[0][1]
    assert 10 <= res[20][0] <= 50, res
    assert rows_again[0][1] == res
    torchrun('main_knn.py', [*KNN, '--data_path', data_path, '--output', two])
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
