"""Segmentation transfer: metrics against an independent computation, datasets and their errors, and end-to-end
runs (one process, torchrun, kill and resume, --eval). The model and checkpoint loading: tests/test_seg_model.py."""
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
import models_seg
import models_vit
from conftest import ROOT, read_log, torchrun
from util.seg_metrics import confusion_matrix, segmentation_metrics

K = 4  # synthetic classes


def reference_metrics(pred, gt, k, ignore=255):
    """Per-class IoU / Acc, aAcc and mIoU by counting pixels in python (nan: class in neither map)."""
    pred, gt = pred.ravel().tolist(), gt.ravel().tolist()
    pairs = [(g, p) for g, p in zip(gt, pred) if g != ignore]
    iou, acc = [], []
    for c in range(k):
        tp = sum(1 for g, p in pairs if g == c and p == c)
        fp = sum(1 for g, p in pairs if g != c and p == c)
        fn = sum(1 for g, p in pairs if g == c and p != c)
        iou.append(100 * tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(100 * tp / (tp + fn) if tp + fn else math.nan)
    valid = [v for v in iou if not math.isnan(v)]
    return iou, acc, sum(valid) / len(valid), 100 * sum(1 for g, p in pairs if g == p) / len(pairs)


def test_metrics_equal_an_independent_count():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 3, (3, 17, 23), generator=g)  # class 3 is never labelled ...
    pred = torch.randint(0, 3, (3, 17, 23), generator=g)  # ... nor predicted -> nan, out of the mean
    gt[torch.rand(gt.shape, generator=g) < 0.2] = 255  # ignored pixels, whatever is predicted there
    pred[0, :4] = 3 * (gt[0, :4] == 255)  # predictions of class 3 only on ignored pixels: still absent
    m = segmentation_metrics(confusion_matrix(pred, gt, K))
    iou, acc, miou, aacc = reference_metrics(pred.numpy(), gt.numpy(), K)
    assert math.isnan(m['iou'][3]) and math.isnan(iou[3])
    np.testing.assert_allclose(m['iou'][:3], iou[:3], rtol=1e-12)
    np.testing.assert_allclose(m['acc'][:3], acc[:3], rtol=1e-12)
    assert m['miou'] == pytest.approx(miou, rel=1e-12) and m['aacc'] == pytest.approx(aacc, rel=1e-12)
    # a class predicted but never labelled has IoU 0 (not nan) and counts in the mean
    pred[1, 0, 0], gt[1, 0, 0] = 3, 0
    m = segmentation_metrics(confusion_matrix(pred, gt, K))
    assert m['iou'][3] == 0 and math.isnan(m['acc'][3])
    assert m['miou'] == pytest.approx(reference_metrics(pred.numpy(), gt.numpy(), K)[2], rel=1e-12)


# ---------------------------------------------------------------- data and end to end

def make_dataset(root, n=(8, 4, 4), size=(40, 56)):
    """A synthetic dataset in the `folder` layout: a bright square of class 1-3 on a class-0 background,
    with a void border; the image shows the class as a colour."""
    colours = np.array([[20, 20, 20], [220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=np.uint8)
    rng = np.random.RandomState(0)
    for split, count in zip(('train', 'val', 'test'), n):
        os.makedirs(root / split / 'images')
        os.makedirs(root / split / 'masks')
        for i in range(count):
            h, w = size
            label = np.zeros((h, w), dtype=np.uint8)
            y, x, s = rng.randint(0, h // 2), rng.randint(0, w // 2), rng.randint(8, h // 2)
            label[y:y + s, x:x + s] = 1 + i % 3
            label[:2] = 255
            img = colours[np.where(label == 255, 0, label)] + rng.randint(0, 20, (h, w, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / split / 'images' / f'f{i:03d}.jpg')
            Image.fromarray(label).save(root / split / 'masks' / f'f{i:03d}.png')
    (root / 'classes.txt').write_text('background\nred\ngreen\nblue\n')
    return root


SEG = ['--model', 'vit_pico_patch4', '--input_size', 32, '--base_size', 32, '--head_channels', 16, '--aux_channels', 8,
       '--batch_size', 4, '--blr', 0.05, '--warmup_iters', 2, '--num_workers', 0, '--print_freq', 1, '--seed', 0]


def run_seg(capsys, argv):
    """main_segmentation in this process, as its command line runs it -> (exit code, stdout, stderr)"""
    import main_segmentation
    import util.misc as misc
    capsys.readouterr()
    args = main_segmentation.get_args_parser().parse_args([str(a) for a in argv])
    try:
        misc.run_main(main_segmentation.main, args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def miou_line(text):
    return [line for line in text.splitlines() if '* mIoU' in line][-1].split('* ')[-1]


def test_train_torchrun_eval_and_same_miou(tmp_path, capsys):
    data = make_dataset(tmp_path / 'data')
    out = tmp_path / 'run'
    torchrun('main_segmentation.py', [*SEG, '--data_path', data, '--epochs', 3, '--batch_size', 2, '--output_dir', out])
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1, 2] and 'test_miou' in log[-1] and len(log[-1]['test_iou']) == 4
    assert Image.open(out / 'predictions.png').size[1] == 2 * 180 + 16  # rank 0's two test images + legend
    evaluate = [*SEG, '--data_path', data, '--eval', '--resume', out / 'checkpoint.pth', '--output_dir', '']
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: the same kernels on the same shapes round alike on any CPU
    try:
        code, one, _ = run_seg(capsys, evaluate)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and '| blue |' in one
    assert float(miou_line(one).split()[1]) == round(log[-1]['test_miou'], 2)  # = 2 processes, exactly
    code, bare, _ = run_seg(capsys, ['--data_path', data, '--eval', '--resume', out / 'checkpoint.pth',
                                     '--output_dir', tmp_path / 'eval', '--num_workers', 0])  # architecture from the checkpoint
    assert code == 0 and miou_line(bare) == miou_line(one)
    assert Image.open(tmp_path / 'eval' / 'predictions.png').size[1] == 4 * 180 + 16  # 4 rows + the legend
    _, batched, _ = run_seg(capsys, [*evaluate, '--eval_batch_size', 4])  # images of one size in one forward
    assert miou_line(batched).split('(')[1] == miou_line(one).split('(')[1]  # the same labelled pixels
    assert_batching_changes_only_rounding(out / 'checkpoint.pth')
    slide = ['--slide', '--crop_size', 24, '--stride', 16]
    two = torchrun('main_segmentation.py', [*evaluate, *slide])
    assert miou_line(two.stdout) == miou_line(run_seg(capsys, [*evaluate, *slide])[1])


def assert_batching_changes_only_rounding(checkpoint, n=4, tol=1e-4):
    """Batched and one-by-one logits differ by fp32 rounding only (the GEMMs block differently): at most tol of
    the largest logit, tol = 1e-4 ~ K * eps for the K <= ~1e3-term reductions of this model, the worst case;
    so the predicted class is the same wherever its margin over the runner-up exceeds 2 * tol * max|logit|.
    (The mIoU of the two can differ by such near-ties, which depend on the CPU's kernels.)"""
    import util.pretrained
    state = torch.load(checkpoint, weights_only=True)
    a = state['args']
    model = models_seg.upernet_vit(a['model'], 4, img_size=a['input_size'], channels=a['head_channels'],
                                   aux_channels=a['aux_channels'], out_indices=a['out_indices'],
                                   aux_head=a['aux_weight'] > 0, rel_pos_bias=a['rel_pos_bias'])
    util.pretrained.load_exact(model, str(checkpoint))
    x = torch.randn(n, 3, 32, 44, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model.eval()(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(n)])
    bound = tol * single.abs().max()
    assert (batched - single).abs().max() <= bound
    top2 = single.topk(2, dim=1).values
    sure = top2[:, 0] - top2[:, 1] > 2 * bound
    assert sure.float().mean() > 0.9 and torch.equal(batched.argmax(1)[sure], single.argmax(1)[sure])


def test_killed_mid_epoch_resumes(tmp_path):
    data = make_dataset(tmp_path / 'data', n=(16, 2, 2))
    out = tmp_path / 'kill'
    argv = [sys.executable, str(ROOT / 'main_segmentation.py'), *map(str, [*SEG, '--data_path', data, '--epochs', 3,
                                                                       '--batch_size', 2, '--output_dir', out])]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    for line in p.stdout:  # steps print one by one (--print_freq 1): kill at step 2 of epoch 1
        if 'Epoch: [1] [2/' in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert 'at epoch 1' in again.stdout and [r['epoch'] for r in read_log(out / 'log.txt')] == [0, 1, 2]


@pytest.mark.parametrize('case', ['missing_mask', 'size', 'label', 'test_label', 'layout', 'architecture',
                                  'out_indices'])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    data = make_dataset(tmp_path / 'data', n=(4, 2, 2))
    argv = [*SEG, '--data_path', data, '--epochs', 1, '--output_dir', tmp_path / 'out']
    if case == 'missing_mask':
        os.remove(data / 'train' / 'masks' / 'f002.png')
        expect = 'no mask for image .*f002.jpg'
    elif case == 'size':
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / 'test' / 'masks' / 'f001.png')
        expect = 'mask .*test/masks/f001.png is 10x10 but its image .*f001.jpg is 56x40'
    elif case == 'label':
        label = np.array(Image.open(data / 'train' / 'masks' / 'f000.png'))
        label[5, 5] = 7
        Image.fromarray(label).save(data / 'train' / 'masks' / 'f000.png')
        argv += ['--num_workers', 1]  # raised in a loader worker: the line is the same
        expect = '^error: mask .*f000.png holds label 7, outside \\[0, 4\\)'
    elif case == 'test_label':  # found before training starts: nothing is trained or saved
        label = np.array(Image.open(data / 'test' / 'masks' / 'f001.png'))
        label[3, 3] = 9
        Image.fromarray(label).save(data / 'test' / 'masks' / 'f001.png')
        expect = 'mask .*test/masks/f001.png holds label 9'
    elif case == 'out_indices':
        argv += ['--out_indices', 1, 1, 2, 3]
        expect = 'out_indices must be 4 increasing block indices'
    elif case == 'layout':
        os.rename(data / 'test' / 'masks', data / 'test' / 'labels')
        expect = 'test/masks is not a folder'
    else:
        torch.save({'model': models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=48, depth=2,
                                                           num_heads=3).state_dict()}, tmp_path / 'other.pth')
        argv += ['--finetune', tmp_path / 'other.pth']
        expect = 'other.pth: checkpoint encoder does not fit this model'
    code, out, err = run_seg(capsys, argv)
    assert code == 2, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    import re
    assert re.search(expect, lines[0]), lines[0]
    if case == 'test_label':
        assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


@pytest.mark.parametrize('fmt', ['ours', 'hf', 'timm'])
def test_finetune_names_the_encoder_in_any_format(tmp_path, fmt):
    """--finetune with an HF ViTMAE folder or a timm encoder file works like our checkpoint; --model comes from it."""
    import main_segmentation
    from util import convert
    state = models_mae.mae_vit_pico_patch4().state_dict()
    if fmt == 'ours':
        path = tmp_path / 'ours.pth'
        torch.save({'model': state, 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 32}}, path)
    elif fmt == 'hf':
        path = tmp_path / 'hf'
        convert.save_hf_folder(convert.mae_to_hf(state), convert.hf_config(convert.arch_from_state(state)), path)
    else:
        path = tmp_path / 'enc.safetensors'
        convert.save_safetensors(convert.mae_to_timm(state)[0], path)
    args = main_segmentation.get_args_parser().parse_args(['--finetune', str(path), '--input_size', '64',
                                                            '--head_channels', '16', '--aux_channels', '8'])
    args.resume, args.output_dir = '', ''
    main_segmentation.resolve_arch(args)
    assert args.model == 'vit_pico_patch4'
    model = main_segmentation.build_model(args, 4)
    assert 'finetune_state' not in vars(args)  # never stored with the args
    assert torch.equal(model.blocks[2].attn.qkv.weight, state['blocks.2.attn.qkv.weight'])


def test_finetune_without_model_through_main(tmp_path, capsys):
    """--finetune of a pretraining checkpoint with no --model: the encoder comes from its args (mae_vit_* ->
    vit_*) and the crop from --input_size; per-step TensorBoard scalars are written from the reads."""
    data = make_dataset(tmp_path / 'data', n=(8, 2, 2))
    state = models_mae.mae_vit_pico_patch4().state_dict()
    torch.save({'model': state, 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 64}}, tmp_path / 'mae.pth')
    argv = [a for a in SEG if a not in ('--model', 'vit_pico_patch4')]
    code, out, err = run_seg(capsys, [*argv, '--data_path', data, '--epochs', 2, '--print_freq', 1, '--output_dir',
                                      tmp_path / 'run', '--finetune', tmp_path / 'mae.pth'])
    assert code == 0, out[-2000:] + err[-2000:]
    assert '--model vit_pico_patch4 (from the checkpoint)' in out and '* mIoU' in out
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    assert ckpt['args']['model'] == 'vit_pico_patch4' and ckpt['args']['input_size'] == 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((tmp_path / 'run').glob('events.out.tfevents*'))))
    events.Reload()
    steps = [e.step for e in events.Scalars('train/loss')]
    assert len(steps) == 4 and len(set(steps)) == 4  # 2 epochs x 2 iterations, one point each
    assert {'train/loss_main', 'train/loss_aux', 'lr', 'test/miou'} <= set(events.Tags()['scalars'])


def test_ade20k_labels_shift_and_check(tmp_path):
    """ADE20K: 0 ('other') -> 255 (ignored), 1..150 -> 0..149; a value above 150 is named as it is in the file."""
    from util.seg_datasets import SegmentationDataset
    for split in ('training', 'validation'):
        os.makedirs(tmp_path / 'images' / split)
        os.makedirs(tmp_path / 'annotations' / split)
        label = np.array([[0, 1, 2], [150, 75, 0]], dtype=np.uint8)
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / 'images' / split / 'a.jpg')
        Image.fromarray(label).save(tmp_path / 'annotations' / split / 'a.png')
    ds = SegmentationDataset(str(tmp_path), 'val', 'ade20k')
    assert len(ds.classes) == 150
    assert ds.load(0)[1].tolist() == [[255, 0, 1], [149, 74, 255]]
    Image.fromarray(np.array([[151, 1, 1], [1, 1, 1]], np.uint8)).save(tmp_path / 'annotations' / 'validation' / 'a.png')
    with pytest.raises(Exception, match=r'a.png holds label 151, outside \[0, 150\]'):
        ds.check_labels()
    with pytest.raises(Exception, match='ADEChallengeData2016/images'):
        SegmentationDataset(str(tmp_path / 'images'), 'train', 'ade20k')


def test_evaluation_turns_cudnn_autotuning_off_and_back_on():
    """Whole images differ in size: autotuning would re-tune every convolution for each new size."""
    import engine_segmentation
    import argparse
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return torch.zeros(x.shape[0], 3, *x.shape[2:])
    args = argparse.Namespace(device=torch.device('cpu'), amp='none', slide=False)
    batch = [(torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.int64)), (torch.zeros(3, 8, 12), torch.zeros(8, 12, dtype=torch.int64))]
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        engine_segmentation.evaluate([batch], Spy(), args, ['a', 'b', 'c'])
        assert seen == [False, False] and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
