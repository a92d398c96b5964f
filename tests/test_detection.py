"""Detection transfer: COCO AP against ground truth and a hand computation, the datasets (layouts, crowd,
large-scale jitter, errors), the prediction figure, and end-to-end runs (torchrun, kill and resume, --eval against
pycocotools on the written results). The model and checkpoint loading: tests/test_det_model.py."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_detection
import models_vit
import util.misc as misc
from conftest import ROOT, read_log, torchrun
from util import coco_eval
from util.det_datasets import CocoDetection, LargeScaleJitter, decode_mask

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
SHARED = ROOT.parent / 'shared' / 'data'


# ---------------------------------------------------------------- COCO evaluation

def ground_truth_as_predictions(ds):
    """Every non-crowd annotation of a split as a detection of score 1 (boxes xyxy, masks as probabilities)."""
    results = []
    for iid in ds.ids:
        im, anns = ds.images[iid], [a for a in ds.anns.get(iid, []) if not a.get('iscrowd')]
        boxes = np.array([a['bbox'] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([decode_mask(a['segmentation'], im['height'], im['width']) for a in anns])[:, None] \
            if anns else np.zeros((0, 1, im['height'], im['width']), np.uint8)
        pred = dict(boxes=boxes, scores=np.ones(len(anns)), masks=masks,
                    labels=[ds.cat_to_label[a['category_id']] for a in anns])
        results += coco_eval.to_coco_results(iid, pred, ds.label_to_cat)
    return results


@pytest.mark.parametrize('name', ['pennfudan', 'coco2017-mini'])
def test_ground_truth_scores_100(name):
    """coco2017-mini has crowd regions (never predicted: ignored, not missed) and category ids with gaps."""
    ds = CocoDetection(str(SHARED / name), 'val', train=False)
    if name == 'coco2017-mini':
        assert any(a['iscrowd'] for a in ds.data['annotations']) and len(ds.classes) == 80
        assert ds.label_to_cat[80] == 90 and ds.cat_to_label[13] == 12  # ids 12, 26, ... are unused
    m = coco_eval.evaluate(coco_eval.coco_from_dict(ds.data), ground_truth_as_predictions(ds))
    for t in ('bbox', 'segm'):
        assert m[t]['stats'][0] == pytest.approx(100, abs=0.1) and m[t]['stats'][1] == pytest.approx(100, abs=0.1)
        assert all(v == pytest.approx(100, abs=0.1) for v in m[t]['per_class'].values())


def square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def crowd_rle():
    crowd = np.zeros((100, 100), np.uint8)
    crowd[0:20, 80:100] = 1
    return coco_eval.encode_masks(crowd[None])[0]['counts']


def test_known_misses_give_the_hand_computed_ap():
    """Class 1: two objects, one found (score 0.9), one missed, one false positive (0.8) -> precision 1 up to
    recall 0.5 and none beyond: 51 of COCO's 101 recall points, AP = 51/101 at every IoU threshold. Class 2:
    one object, one detection at IoU 0.64 -> a hit at the thresholds 0.50, 0.55, 0.60 only: AP = 3/10, AP50 = 1.
    A detection on a crowd region is ignored (not a false positive)."""
    def ann(i, cat, box, seg, crowd=0):
        return {'id': i, 'image_id': 1, 'category_id': cat, 'bbox': box, 'area': box[2] * box[3], 'iscrowd': crowd,
                'segmentation': seg}
    gt = {'images': [{'id': 1, 'width': 100, 'height': 100}], 'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}],
          'annotations': [ann(1, 1, [0, 0, 20, 20], square(0, 0, 20)), ann(2, 1, [50, 50, 20, 20], square(50, 50, 20)),
                          ann(3, 2, [0, 50, 20, 25], [[0, 50, 20, 50, 20, 75, 0, 75]]),
                          ann(4, 1, [80, 0, 20, 20], {'size': [100, 100], 'counts': crowd_rle()}, crowd=1)]}
    masks = np.zeros((4, 1, 100, 100), np.float32)
    masks[0, 0, 0:20, 0:20] = 1  # = object 1
    masks[1, 0, 30:40, 30:40] = 1  # nothing there
    masks[2, 0, 50:66, 0:20] = 1  # object 3 is rows 50-75: IoU 16/25 = 0.64
    masks[3, 0, 0:20, 80:100] = 1  # on the crowd region
    pred = dict(boxes=[[0, 0, 20, 20], [30, 30, 40, 40], [0, 50, 20, 66], [80, 0, 100, 20]],
                scores=[0.9, 0.8, 0.7, 0.95], labels=[1, 1, 2, 1], masks=masks)
    m = coco_eval.evaluate(coco_eval.coco_from_dict(gt), coco_eval.to_coco_results(1, pred, {1: 1, 2: 2}))
    for t in ('bbox', 'segm'):
        assert m[t]['per_class'][1] == pytest.approx(100 * 51 / 101, abs=1e-6)
        assert m[t]['per_class'][2] == pytest.approx(100 * 3 / 10, abs=1e-6)
        assert m[t]['stats'][0] == pytest.approx(100 * (51 / 101 + 3 / 10) / 2, abs=1e-6)
        assert m[t]['stats'][1] == pytest.approx(100 * (51 / 101 + 1) / 2, abs=1e-6)
    assert coco_eval.summary_line(m).startswith('* bbox AP 40.25 AP50 75.25 segm AP 40.25')


# ---------------------------------------------------------------- data

CATS = [{'id': 3, 'name': 'red'}, {'id': 7, 'name': 'blue'}]  # ids with a gap: labels 1, 2


def make_coco(root, n=(8, 4), size=(48, 64), layout='ours', obj=(10, 20)):
    """A synthetic COCO-format set: on a noisy background 1-2 squares of colour red (id 3) or blue (id 7), with
    polygon masks; train image 0 has no annotation, val image 0 also a crowd region (RLE)."""
    rng = np.random.RandomState(0)
    colours = {3: (220, 40, 40), 7: (40, 40, 220)}
    os.makedirs(root / 'annotations')
    next_id = 1
    for split, count in zip(('train', 'val'), n):
        folder = root / (split if layout == 'ours' else f'{split}2017')
        os.makedirs(folder)
        data = {'images': [], 'annotations': [], 'categories': CATS}
        for i in range(count):
            h, w = size
            img = rng.randint(0, 60, (h, w, 3)).astype(np.uint8)
            iid = 100 * (split == 'val') + i + 1
            data['images'].append({'id': iid, 'file_name': f'{split}_{i}.png', 'width': w, 'height': h})
            for k in range(0 if split == 'train' and i == 0 else 1 + i % 2):
                s = rng.randint(*obj)
                x, y, cat = rng.randint(0, w - s), rng.randint(0, h - s), (3, 7)[(i + k) % 2]
                img[y:y + s, x:x + s] = colours[cat]
                data['annotations'].append({'id': next_id, 'image_id': iid, 'category_id': cat, 'iscrowd': 0,
                                            'bbox': [x, y, s, s], 'area': s * s, 'segmentation': square(x, y, s)})
                next_id += 1
            if split == 'val' and i == 0:
                crowd = np.zeros((h, w), np.uint8)
                crowd[:6, :10] = 1
                data['annotations'].append({'id': next_id, 'image_id': iid, 'category_id': 3, 'iscrowd': 1, 'area': 60,
                                            'bbox': [0, 0, 10, 6], 'segmentation': coco_eval.encode_masks(crowd[None])[0]})
                next_id += 1
            Image.fromarray(img).save(folder / f'{split}_{i}.png')
        name = f'instances_{split}.json' if layout == 'ours' else f'instances_{split}2017.json'
        (root / 'annotations' / name).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize('layout', ['ours', 'coco2017'])
def test_dataset_labels_crowd_and_empty_images(tmp_path, layout):
    root = make_coco(tmp_path, layout=layout)
    train = CocoDetection(str(root), 'train', train=True)
    val = CocoDetection(str(root), 'val', train=False)
    assert train.label_to_cat == {1: 3, 2: 7} and train.classes == ['red', 'blue']
    assert train.ids == list(range(2, 9)) and len(val) == 4  # train image 1 has no object: skipped in training
    img, t = train[0]
    anns = train.anns[2]
    x, y, s = anns[0]['bbox'][:3]
    assert img.shape == (3, 48, 64) and t['labels'].tolist() == [2 - (a['category_id'] == 3) for a in anns]
    torch.testing.assert_close(t['boxes'][0], torch.tensor([x, y, x + s, y + s], dtype=torch.float32))
    assert t['masks'].shape == (len(t['boxes']), 48, 64) and t['masks'][0].sum() == s * s
    v_img, v_t = val[0]
    assert set(v_t) == {'image_id', 'orig_size'} and v_t['image_id'] == 101
    crowd_train = CocoDetection(str(root), 'val', train=True)  # the crowd region is no training object
    assert all(len(crowd_train[i][1]['boxes']) == len([a for a in crowd_train.anns[crowd_train.ids[i]] if not a['iscrowd']])
               for i in range(len(crowd_train)))


def test_large_scale_jitter_crops_boxes_and_masks_with_the_image():
    """Boxes stay the tight boxes of their masks (within the rounding of the nearest-neighbour mask resize),
    inside the crop; objects cropped away are dropped with their label and mask."""
    torch.manual_seed(0)
    lsj = LargeScaleJitter(64, (0.5, 2.0))
    img = torch.rand(3, 80, 100)
    masks = torch.zeros(3, 80, 100, dtype=torch.uint8)
    boxes = torch.tensor([[10., 10, 40, 30], [60, 40, 95, 75], [0, 70, 3, 80]])
    for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
        m[y1:y2, x1:x2] = 1
    sizes, dropped = set(), 0
    for _ in range(30):
        out_img, out = lsj(img, {'boxes': boxes, 'labels': torch.tensor([1, 2, 1]), 'masks': masks})
        h, w = out_img.shape[1:]
        sizes.add((h, w))
        assert h <= 64 and w <= 64 and out['masks'].shape == (len(out['boxes']), h, w) and len(out['labels']) == len(out['boxes'])
        dropped += 3 - len(out['boxes'])
        for b, m in zip(out['boxes'], out['masks']):
            ys, xs = torch.where(m > 0)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (b[2:] - b[:2] >= 1).all() and (b[0::2] <= w).all() and (b[1::2] <= h).all()
            torch.testing.assert_close(b, tight, atol=1.01, rtol=0)
    assert len(sizes) > 5 and dropped > 0


def test_prediction_figure(tmp_path):
    """One row per image, ground truth | predictions above the score threshold (integer labels, pasted masks)."""
    from engine_detection import save_figure
    ds = CocoDetection(str(make_coco(tmp_path / 'data', n=(1, 2))), 'val', train=False)
    masks = torch.zeros(2, 1, 48, 64)
    masks[0, 0, 5:20, 5:20] = 0.9
    out = {'boxes': torch.tensor([[5., 5, 20, 20], [30, 10, 50, 30]]), 'scores': torch.tensor([0.9, 0.2]),
           'labels': torch.tensor([1, 2]), 'masks': masks}
    black = torch.zeros(3, 48, 64)
    save_figure([(black, 101, out), (ds[1][0], 102, out)], ds, tmp_path / 'fig.png', min_score=0.5, height=96)
    fig = np.array(Image.open(tmp_path / 'fig.png')).astype(int)
    assert fig.shape == (2 * 96, 2 * 128 + 4, 3)
    right = fig[:96, 132:]  # row 1's prediction panel at x2: the score-0.9 mask is half the colour of label 1
    assert np.abs(right[22:28, 22:28] - np.array([30, 90, 37])).max() <= 1
    assert np.abs(right[60:80, 60:100]).max() == 0  # the 0.2 detection is not drawn


def run_det(capsys, argv):
    """main_detection in this process, as its command line runs it -> (exit code, stdout, stderr)"""
    capsys.readouterr()
    args = main_detection.get_args_parser().parse_args([str(a) for a in argv])
    try:
        misc.run_main(main_detection.main, args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


DET = ['--model', 'vit_pico_patch4', '--input_size', 64, '--fpn_channels', 16, '--fc_dim', 32, '--rpn_pre_nms', 200, 100,
       '--rpn_post_nms', 100, 50, '--roi_batch_size', 32, '--rpn_batch_size', 64, '--detections_per_img', 20,
       '--scale_range', 0.8, 1.2, '--lr', 3e-3, '--warmup_iters', 2, '--drop_path', 0, '--num_workers', 0, '--seed', 0,
       '--score_thresh', 0.01, '--layer_decay', 1, '--anchor_sizes', 8, 16, 24, 32, 48]


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize('case', ['no_annotations', 'not_json', 'not_coco', 'image_missing', 'image_id', 'category_id',
                                  'negative_width', 'nan_box', 'polygon', 'architecture'])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    root = make_coco(tmp_path / 'data', n=(3, 2))
    train, val = root / 'annotations' / 'instances_train.json', root / 'annotations' / 'instances_val.json'
    argv = [*DET, '--data_path', root, '--epochs', 1, '--output_dir', tmp_path / 'out']
    if case == 'no_annotations':
        os.remove(val)
        expect = 'annotation file missing: expected annotations/instances_val.json'
    elif case == 'not_json':
        val.write_text('{"images": [')
        expect = 'instances_val.json: not a COCO annotation file \\(cannot read JSON'
    elif case == 'not_coco':
        val.write_text('{"images": []}')
        expect = 'instances_val.json: not a COCO annotation file \\(no "annotations" list\\)'
    elif case == 'image_missing':
        os.remove(root / 'train' / 'train_2.png')
        expect = 'instances_train.json: image id 3 lists train_2.png, missing on disk'
    elif case == 'image_id':
        edit_json(train, lambda d: d['annotations'][1].update(image_id=99))
        expect = 'instances_train.json: annotation id 2: image id 99 is not listed'
    elif case == 'category_id':
        edit_json(val, lambda d: d['annotations'][0].update(category_id=5))
        expect = 'instances_val.json: annotation id \\d+: category id 5 is not listed'
    elif case == 'negative_width':
        edit_json(train, lambda d: d['annotations'][0].update(bbox=[3, 4, -2, 5]))
        expect = 'instances_train.json: annotation id 1: malformed bbox \\[3, 4, -2, 5\\]'
    elif case == 'nan_box':
        edit_json(train, lambda d: d['annotations'][0].update(bbox=[3, float('nan'), 2, 5]))
        expect = 'instances_train.json: annotation id 1: malformed bbox \\[3, nan, 2, 5\\]'
    elif case == 'polygon':
        edit_json(train, lambda d: d['annotations'][1].update(segmentation=[[1, 2, 3, 4]]))
        expect = 'instances_train.json: annotation id 2: malformed polygon'
    else:
        torch.save({'model': models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=48, depth=2,
                                                           num_heads=3).state_dict()}, tmp_path / 'other.pth')
        argv += ['--finetune', tmp_path / 'other.pth']
        expect = 'other.pth: checkpoint encoder does not fit this model'
    code, out, err = run_det(capsys, argv)
    assert code == 2, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert re.search(expect, lines[0]), lines[0]
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


def test_box_partly_outside_is_clipped_with_a_warning(tmp_path, capsys):
    root = make_coco(tmp_path, n=(3, 1))
    edit_json(root / 'annotations' / 'instances_train.json', lambda d: d['annotations'][0].update(bbox=[50, 40, 30, 20]))
    ds = CocoDetection(str(root), 'train', train=True, masks=False)
    assert '1 boxes lie partly outside their image; they are clipped' in capsys.readouterr().out
    assert ds[0][1]['boxes'][0].tolist() == [50, 40, 64, 48]


def ap_line(text):
    return [line for line in text.splitlines() if '* bbox AP' in line][-1].split('* ')[-1]


def test_killed_run_resumes_under_torchrun_and_eval_equals_pycocotools(tmp_path, capsys):
    """One process trains and is killed in epoch 1; torchrun (2 processes) resumes from the epoch-0 checkpoint,
    trains to the end and evaluates; one process evaluating the final checkpoint prints the same AP, and that is
    pycocotools' own on the written results file against the annotation file."""
    data, out = make_coco(tmp_path / 'data', obj=(18, 30)), tmp_path / 'run'  # large: found after a few steps
    argv = [*map(str, [*DET, '--data_path', data, '--epochs', 4, '--print_freq', 1, '--output_dir', out])]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen([sys.executable, str(ROOT / 'main_detection.py'), *argv, '--batch_size', '2'], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in p.stdout:  # 7 training images: 3 steps per epoch (batch 2, or 1 on each of 2 processes)
        if 'Epoch: [1] [1/' in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    two = torchrun('main_detection.py', [*argv, '--batch_size', 1], env={'PYTHONUNBUFFERED': '1'})
    assert 'at epoch 1' in two.stdout and 'effective batch size: 2' in two.stdout
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1, 2, 3] and len(log[-1]['test_segm_stats']) == 12
    assert Image.open(out / 'predictions.png').size[1] == 2 * 240  # rank 0's two val images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert {'train/loss', 'train/loss_classifier', 'train/loss_box_reg', 'train/loss_mask', 'train/loss_objectness',
            'train/loss_rpn_box_reg', 'lr', 'test/bbox_AP', 'test/segm_AP'} <= set(events.Tags()['scalars'])

    capsys.readouterr()
    args = main_detection.get_args_parser().parse_args(
        [*map(str, [*DET, '--data_path', data, '--eval', '--resume', out / 'checkpoint.pth', '--output_dir', tmp_path / 'eval'])])
    one = main_detection.main(args)
    printed = capsys.readouterr().out
    assert ap_line(printed).split(' (')[0] == ap_line(two.stdout).split(' (')[0] and '| blue |' in printed
    for t in ('bbox', 'segm'):
        assert one[t]['stats'] == pytest.approx(log[-1][f'test_{t}_stats'], abs=1e-9)  # 2 processes = 1
    results = json.loads((tmp_path / 'eval' / 'coco_instances_results.json').read_text())
    assert results and set(results[0]) == {'image_id', 'category_id', 'bbox', 'score', 'segmentation'}
    assert {r['category_id'] for r in results} <= {3, 7}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data / 'annotations' / 'instances_val.json'))
        for t in ('bbox', 'segm'):  # for masks without the box field, so that areas come from the masks
            ev = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if not (t == 'segm' and k == 'bbox')}
                                          for r in results]), t)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert [100 * v for v in ev.stats] == pytest.approx(one[t]['stats'], abs=1e-9)
            assert f'{t} AP {100 * ev.stats[0]:.2f} AP50 {100 * ev.stats[1]:.2f}' in ap_line(printed)
    assert one['bbox']['stats'][8] > 0  # AR@100: detections overlap the objects, the numbers compared are not all 0
