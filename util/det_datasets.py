"""COCO-format detection datasets (boxes, labels, instance masks), large-scale jitter, and their loaders.

Layouts (`--dataset coco`, `--data_path ROOT`), tried in this order:
- ours: `ROOT/{train,val}/*.jpg`, `ROOT/annotations/instances_{train,val}.json`;
- COCO 2017: `ROOT/{train,val}2017/*.jpg`, `ROOT/annotations/instances_{train,val}2017.json`.

Category ids (any, with gaps) map to labels 1..K in id order (0 is the background) and back for the results
file. Training ignores crowd annotations and skips images left without an object; evaluation keeps everything
(pycocotools reads crowd regions as ignore areas). The annotation file is validated when the dataset is built,
so bad input stops before training with one line naming the file and the record.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.transforms.functional import pil_to_tensor

from util.datasets import ResumableSampler, SeededPerSample
from util.misc import UserError

LAYOUTS = (('{split}', 'instances_{split}.json'), ('{split}2017', 'instances_{split}2017.json'))


def find_split(root, split):
    """-> (image folder, annotation file) of `split` in either layout."""
    if not root or not os.path.isdir(root):
        raise UserError(f'--data_path {root!r} is not a folder')
    for folder, ann in LAYOUTS:
        ann_file = os.path.join(root, 'annotations', ann.format(split=split))
        if os.path.isfile(ann_file):
            return os.path.join(root, folder.format(split=split)), ann_file
    raise UserError(f'{root}: annotation file missing: expected annotations/instances_{split}.json (with {split}/) '
                    f'or annotations/instances_{split}2017.json (with {split}2017/)')


def read_coco_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f'{path}: not a COCO annotation file (cannot read JSON: {e})') from e
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise UserError(f'{path}: not a COCO annotation file (no "{key}" list)')
    return data


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def check_segmentation(seg, where):
    """Polygons: a list of [x1, y1, x2, y2, ...] with >= 3 finite points each; RLE: {'size': [h, w], 'counts'}."""
    if isinstance(seg, dict):
        if not (isinstance(seg.get('size'), list) and len(seg['size']) == 2 and isinstance(seg.get('counts'), (str, list))):
            raise UserError(f'{where}: malformed RLE segmentation (expected {{"size": [h, w], "counts": ...}})')
        return
    if not isinstance(seg, list) or not seg:
        raise UserError(f'{where}: malformed segmentation (expected a list of polygons or an RLE dict)')
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not _finite(poly):
            raise UserError(f'{where}: malformed polygon (expected a list of [x1, y1, x2, y2, ...] with at least 3 '
                            f'points of finite numbers, got {str(poly)[:60]})')


def validate(data, path, img_dir):
    """Checks every record (one UserError naming the file and the record) -> (images by id, categories sorted by
    id, annotations by image id, number of boxes partly outside their image)."""
    images = {}
    for im in data['images']:
        iid = im.get('id') if isinstance(im, dict) else None
        if not _is_int(iid) or not isinstance(im.get('file_name'), str) or not all(
                _is_int(im.get(k)) and im[k] > 0 for k in ('width', 'height')):
            raise UserError(f'{path}: image record {str(im)[:80]} needs an integer "id", a "file_name" and positive '
                            'integer "width" and "height"')
        if iid in images:
            raise UserError(f'{path}: image id {iid} is listed twice')
        if not os.path.isfile(os.path.join(img_dir, im['file_name'])):
            raise UserError(f'{path}: image id {iid} lists {im["file_name"]}, missing on disk '
                            f'({os.path.join(img_dir, im["file_name"])})')
        images[iid] = im
    cats = sorted(data['categories'], key=lambda c: c.get('id', 0) if isinstance(c, dict) else 0)
    if not cats or any(not isinstance(c, dict) or not _is_int(c.get('id')) for c in cats) or \
            len({c['id'] for c in cats}) != len(cats):
        raise UserError(f'{path}: "categories" must be a non-empty list of records with distinct integer ids')
    cat_ids, by_image, clipped = {c['id'] for c in cats}, {}, 0
    for a in data['annotations']:
        where = f'{path}: annotation id {a.get("id") if isinstance(a, dict) else a}'
        if not isinstance(a, dict) or not _is_int(a.get('id')):
            raise UserError(f'{where}: needs an integer "id"')
        if a.get('image_id') not in images:
            raise UserError(f'{where}: image id {a.get("image_id")!r} is not listed in "images"')
        if a.get('category_id') not in cat_ids:
            raise UserError(f'{where}: category id {a.get("category_id")!r} is not listed in "categories"')
        box, im = a.get('bbox'), images[a['image_id']]
        if not isinstance(box, list) or len(box) != 4 or not _finite(box) or box[2] < 0 or box[3] < 0:
            raise UserError(f'{where}: malformed bbox {box} (expected [x, y, width, height], finite, width and '
                            'height >= 0)')
        if box[0] < 0 or box[1] < 0 or box[0] + box[2] > im['width'] or box[1] + box[3] > im['height']:
            clipped += 1
        if 'segmentation' in a:
            check_segmentation(a['segmentation'], where)
        by_image.setdefault(a['image_id'], []).append(a)
    return images, cats, by_image, clipped


def decode_mask(seg, h, w):
    """COCO segmentation (polygons, RLE or uncompressed RLE) -> uint8 [h, w]"""
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg['counts'], list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_util.decode(rle)


class CocoDetection(torch.utils.data.Dataset):
    """One split. __getitem__ -> (image float [3, H, W] in [0, 1], target). train=True: target has boxes
    [N, 4] (xyxy, clipped to the image), labels [N] (1..K), masks [N, H, W] uint8 (with masks=True), then goes
    through `transform`; evaluation targets hold only image_id and orig_size (the ground truth is the file)."""

    def __init__(self, root, split, train, transform=None, masks=True, subset=0):
        self.img_dir, self.ann_file = find_split(root, split)
        self.data = read_coco_json(self.ann_file)
        self.images, cats, self.anns, clipped = validate(self.data, self.ann_file, self.img_dir)
        self.train, self.transform, self.masks = train, transform, masks
        self.label_to_cat = {i + 1: c['id'] for i, c in enumerate(cats)}
        self.cat_to_label = {c: i for i, c in self.label_to_cat.items()}
        self.classes = [str(c.get('name', c['id'])) for c in cats]
        ids = sorted(self.images)
        if train:  # images with at least one usable object
            ids = [i for i in ids if any(not a.get('iscrowd') and a['bbox'][2] > 0 and a['bbox'][3] > 0
                                         for a in self.anns.get(i, []))]
        self.ids = ids[:subset] if subset else ids
        if clipped:
            print(f'warning: {self.ann_file}: {clipped} boxes lie partly outside their image; they are clipped to it')

    def __len__(self):
        return len(self.ids)

    def load_image(self, iid):
        im = self.images[iid]
        path = os.path.join(self.img_dir, im['file_name'])
        try:
            with open(path, 'rb') as f:
                img = Image.open(f).convert('RGB')
        except OSError as e:
            raise UserError(f'cannot read image {path}: {e}') from e
        if img.size != (im['width'], im['height']):
            raise UserError(f'{self.ann_file}: image id {iid} is {im["width"]}x{im["height"]} there but {path} is '
                            f'{img.size[0]}x{img.size[1]}')
        return pil_to_tensor(img).float().div_(255)

    def __getitem__(self, index):
        iid = self.ids[index]
        img = self.load_image(iid)
        h, w = img.shape[1:]
        target = {'image_id': iid, 'orig_size': (h, w)}
        if not self.train:
            return img, target
        anns = [a for a in self.anns.get(iid, []) if not a.get('iscrowd')]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target['boxes'] = boxes[keep]
        target['labels'] = torch.tensor([self.cat_to_label[a['category_id']] for a in anns], dtype=torch.int64)[keep]
        if self.masks:
            masks = [decode_mask(a['segmentation'], h, w) if 'segmentation' in a else box_mask(a['bbox'], h, w)
                     for a, k in zip(anns, keep.tolist()) if k]
            target['masks'] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        return self.transform(img, target) if self.transform is not None else (img, target)


def box_mask(box, h, w):
    """The box as a mask, for an annotation without a segmentation."""
    m = np.zeros((h, w), dtype=np.uint8)
    x, y, bw, bh = box
    m[max(int(y), 0):max(int(math.ceil(y + bh)), 0), max(int(x), 0):max(int(math.ceil(x + bw)), 0)] = 1
    return m


class LargeScaleJitter:
    """ViTDet's training augmentation: horizontal flip, resize by a factor s ~ U(scale_range) of the size that
    fits the image in size x size (aspect kept), then a random size x size crop where the image is larger.
    Boxes are cropped with the image; those left under 1 px in width or height are dropped with their label and
    mask. Smaller images are padded to the square by the model (DetectionTransform). Draws use torch's RNG."""

    def __init__(self, size, scale_range=(0.1, 2.0)):
        self.size, self.scale_range = size, tuple(scale_range)

    def __call__(self, img, target):
        _, h, w = img.shape
        boxes, masks = target['boxes'].clone(), target.get('masks')
        if float(torch.rand(())) < 0.5:
            img = img.flip(-1)
            boxes[:, 0::2] = w - boxes[:, [2, 0]]  # x1' = w - x2, x2' = w - x1
            masks = masks.flip(-1) if masks is not None else None
        lo, hi = self.scale_range
        f = (lo + (hi - lo) * float(torch.rand(()))) * self.size / max(h, w)
        nh, nw = max(round(h * f), 1), max(round(w * f), 1)
        img = F.interpolate(img[None], size=(nh, nw), mode='bilinear', align_corners=False, antialias=True)[0]
        boxes *= torch.tensor([nw / w, nh / h, nw / w, nh / h])
        ch, cw = min(self.size, nh), min(self.size, nw)
        y0, x0 = int(torch.randint(nh - ch + 1, ())), int(torch.randint(nw - cw + 1, ()))
        img = img[:, y0:y0 + ch, x0:x0 + cw]
        boxes -= torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        boxes[:, 0::2].clamp_(0, cw)
        boxes[:, 1::2].clamp_(0, ch)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # degenerate boxes are dropped
        out = {**target, 'boxes': boxes[keep], 'labels': target['labels'][keep]}
        if masks is not None:  # nearest: masks are labels
            masks = masks[keep]
            masks = F.interpolate(masks[None], size=(nh, nw), mode='nearest')[0] if len(masks) else masks.new_zeros(0, nh, nw)
            out['masks'] = masks[:, y0:y0 + ch, x0:x0 + cw].contiguous()
        return img, out


def collate(batch):
    """[(image, target)] -> ([images], [targets]): detection images keep their own sizes."""
    return tuple(zip(*batch))


def build_loader(dataset, args, train):
    """Training: ResumableSampler over the processes (order from seed and epoch, as util.datasets.build_loader)
    and workers that seed per sample; evaluation: every world_size-th image from rank, no padding."""
    if train:
        sampler = ResumableSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                   seed=args.seed, drop_last=True)
        if args.num_workers > 0:
            import multiprocessing
            sampler.shared_epoch = multiprocessing.RawValue('q', 0)
            dataset = SeededPerSample(dataset, args.seed, args.rank, sampler.shared_epoch)
        batch_size, drop_last = args.batch_size, True
    else:
        sampler, batch_size, drop_last = list(range(args.rank, len(dataset), args.world_size)), args.eval_batch_size, False
    workers = args.num_workers
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate, drop_last=drop_last, persistent_workers=train and workers > 0,
                                       pin_memory=args.pin_mem and args.device.type == 'cuda',
                                       prefetch_factor=args.prefetch_factor if workers > 0 else None)
