"""Detections -> COCO results, and COCO evaluation (box / mask AP) with pycocotools.

A results record is {'image_id', 'category_id' (the file's id), 'score', 'bbox': [x, y, w, h] in original image
pixels, 'segmentation': RLE with str counts (mask models)} -- one list for both boxes and masks, as detectron2's
coco_instances_results.json. Mask AP is computed with the 'bbox' field removed (as detectron2 does), so that
pycocotools takes each instance's area from its mask, not its box, for the small / medium / large ranges.
"""
import contextlib
import copy
import io
import math

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def coco_from_dict(data):
    """A pycocotools COCO over an annotation dict already in memory (quietly)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_masks(masks):
    """masks: bool/uint8 [N, H, W] -> [RLE dicts with str counts]"""
    rles = mask_util.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r['counts'] = r['counts'].decode('utf-8')
    return rles


def to_coco_results(image_id, pred, label_to_cat, mask_threshold=0.5):
    """pred: {'boxes' [N, 4] xyxy, 'scores' [N], 'labels' [N] (1..K), optional 'masks' [N, 1, H, W] probabilities}
    (tensors or arrays, original image coordinates) -> [results records]"""
    boxes = np.asarray(pred['boxes'], dtype=np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    scores, labels = np.asarray(pred['scores']).tolist(), np.asarray(pred['labels']).tolist()
    out = [{'image_id': int(image_id), 'category_id': int(label_to_cat[int(lab)]), 'bbox': [round(v, 2) for v in b],
            'score': round(float(s), 5)} for b, s, lab in zip(xywh.tolist(), scores, labels)]
    if 'masks' in pred and len(out):
        masks = np.asarray(pred['masks'])[:, 0] > mask_threshold
        for r, rle in zip(out, encode_masks(masks)):
            r['segmentation'] = rle
    return out


def evaluate(coco_gt, results, iou_types=('bbox', 'segm'), img_ids=None):
    """COCOeval of `results` against coco_gt per type -> {type: {'stats': 12 floats in % (-100: no ground truth
    in that range), 'per_class': {category id: AP in % (nan: no ground truth)}}}. img_ids: the images evaluated
    (default: all of coco_gt)."""
    out = {}
    for iou_type in iou_types:
        dets = copy.deepcopy(results)  # loadRes adds fields to the records
        if iou_type == 'segm':
            for d in dets:
                d.pop('bbox', None)
        with contextlib.redirect_stdout(io.StringIO()):
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # loadRes refuses an empty list: no detection at all scores 0
                coco_dt = coco_from_dict({'images': coco_gt.dataset['images'], 'annotations': [],
                                          'categories': coco_gt.dataset['categories']})
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if img_ids is not None:
                ev.params.imgIds = sorted(img_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        precision = ev.eval['precision']  # [iou thresholds, recall points, classes, area ranges, max dets]
        per_class = {}
        for k, cat in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[cat] = float(p.mean() * 100) if p.size else math.nan
        out[iou_type] = {'stats': [float(s) * 100 for s in ev.stats], 'per_class': per_class}
    return out


def summary_line(metrics):
    """'* bbox AP x AP50 y segm AP z AP50 w' (segm only when evaluated)"""
    return '* ' + ' '.join(f'{t} AP {m["stats"][0]:.2f} AP50 {m["stats"][1]:.2f}' for t, m in metrics.items())


def format_stats(metrics):
    """The 12 COCO numbers of each type, one line each."""
    return '\n'.join(f'{t}: ' + '  '.join(f'{n} {v:.2f}' for n, v in zip(STAT_NAMES, m['stats']))
                     for t, m in metrics.items())


def format_table(metrics, names):
    """Per-class AP of each type as a Markdown table; names: {category id: name}."""
    types = list(metrics)
    rows = [f'| {names[c]} | ' + ' | '.join(f'{metrics[t]["per_class"][c]:.2f}' for t in types) + ' |'
            for c in metrics[types[0]]['per_class']]
    return '\n'.join(['| class | ' + ' | '.join(f'{t} AP' for t in types) + ' |',
                      '|---|' + '---:|' * len(types), *rows])
