"""Segmentation datasets (image + per-pixel label map) and their joint transforms, with clear errors.

Layouts:
- `folder`: `<root>/<split>/images/<name>.jpg|png`, `<root>/<split>/masks/<name>.png` (same stems),
  `<root>/classes.txt` (line i = name of class i); labels 0..K-1, 255 = void (ignored).
- `ade20k`: `ADEChallengeData2016/images/{training,validation}/*.jpg`, `annotations/{...}/*.png`; label 0
  ("other") is ignored and 1..150 become 0..149 (mmseg's reduce_zero_label).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from util.datasets import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from util.misc import UserError

IGNORE_INDEX = 255
IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
ADE_SPLITS = {'train': 'training', 'val': 'validation'}


def _stems(folder, exts):
    return {os.path.splitext(f)[0]: f for f in sorted(os.listdir(folder)) if f.lower().endswith(exts)}


def _pairs(img_dir, mask_dir, layout):
    """[(image path, mask path)] sorted by name; every image needs a mask of the same stem and size."""
    for d in (img_dir, mask_dir):
        if not os.path.isdir(d):
            raise UserError(f'{d} is not a folder (expected {layout})')
    images, masks = _stems(img_dir, IMAGE_EXTS), _stems(mask_dir, ('.png',))
    if not images:
        raise UserError(f'{img_dir} holds no images (.jpg, .jpeg, .png)')
    missing = [images[s] for s in images if s not in masks]
    if missing:
        raise UserError(f'no mask for image {os.path.join(img_dir, missing[0])} (expected '
                        f'{os.path.join(mask_dir, os.path.splitext(missing[0])[0] + ".png")}); {len(missing)} missing')
    pairs = [(os.path.join(img_dir, images[s]), os.path.join(mask_dir, masks[s])) for s in images]
    for img, mask in pairs:  # header reads only: cheap even for ADE20K
        with Image.open(img) as a, Image.open(mask) as b:
            if a.size != b.size:
                raise UserError(f'mask {mask} is {b.size[0]}x{b.size[1]} but its image {img} is {a.size[0]}x{a.size[1]}')
    return pairs


def dataset_splits(root, kind='folder'):
    """The splits a dataset root holds (in the order train, val, test)."""
    if kind == 'ade20k':
        return [s for s, d in ADE_SPLITS.items() if os.path.isdir(os.path.join(root, 'images', d))]
    return [s for s in ('train', 'val', 'test') if os.path.isdir(os.path.join(root, s))]


def read_classes(root, kind):
    if kind == 'ade20k':
        for name in ('objectInfo150.txt', 'objectInfo150.csv'):  # shipped with ADEChallengeData2016
            path = os.path.join(root, name)
            if os.path.isfile(path):
                rows = [r for r in open(path, encoding='utf-8').read().splitlines()[1:] if r.strip()]
                names = [r.replace(',', '\t').split('\t')[-1].split(';')[0].strip() for r in rows]
                if len(names) == 150:
                    return names
        return [f'class_{i}' for i in range(150)]
    path = os.path.join(root, 'classes.txt')
    if not os.path.isfile(path):
        raise UserError(f'{root} has no classes.txt (one class name per line; line i = label i)')
    names = [line.strip() for line in open(path, encoding='utf-8') if line.strip()]
    if not names or len(names) >= IGNORE_INDEX:
        raise UserError(f'{path} must name between 1 and {IGNORE_INDEX - 1} classes, found {len(names)}')
    return names


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label-map pairs of one split. __getitem__ -> transform(PIL image, uint8 label array [H, W])."""

    def __init__(self, root, split, kind='folder', transform=None, subset=0):
        if not root or not os.path.isdir(root):
            raise UserError(f'--data_path {root!r} is not a folder')
        self.root, self.split, self.kind, self.transform = root, split, kind, transform
        if kind == 'ade20k':
            if split not in ADE_SPLITS:
                raise UserError(f'ADE20K has the splits train and val, not {split!r}')
            img_dir, mask_dir = (os.path.join(root, d, ADE_SPLITS[split]) for d in ('images', 'annotations'))
            layout = 'ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/{...}/*.png'

        elif kind == 'folder':
            if not os.path.isdir(os.path.join(root, split)):
                raise UserError(f'{root} has no {split}/ folder (expected {split}/images/*.jpg and {split}/masks/*.png'
                                f'; found: {sorted(os.listdir(root))[:6]})')
            img_dir, mask_dir = os.path.join(root, split, 'images'), os.path.join(root, split, 'masks')
            layout = '<split>/images/*.jpg and <split>/masks/*.png'
        else:
            raise UserError(f'unknown --dataset {kind!r}; choose folder or ade20k')
        self.classes = read_classes(root, kind)
        self.samples = _pairs(img_dir, mask_dir, layout)
        if subset and subset < len(self.samples):
            self.samples = self.samples[:subset]  # the first images by name: a fixed subset

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """-> PIL RGB image, label array [H, W] uint8 with classes 0..K-1 and 255 = ignore (checked)."""
        img_path, mask_path = self.samples[index]
        try:
            with open(img_path, 'rb') as f:
                img = Image.open(f).convert('RGB')
            label = np.array(Image.open(mask_path))
        except OSError as e:
            raise UserError(f'cannot read {img_path} or {mask_path}: {e}') from e
        return img, self.check_label(label, mask_path)

    def check_label(self, label, mask_path):
        """Raw mask array -> labels 0..K-1 / 255 (ADE20K: shifted down by one), or one error naming the file."""
        if label.ndim != 2:
            raise UserError(f'mask {mask_path} has {label.ndim} dimensions; expected a single-channel label map')
        if self.kind == 'ade20k':  # 0 = "other" -> ignore, 1..150 -> 0..149
            bad = label[label > len(self.classes)]
            if bad.size:
                raise UserError(f'mask {mask_path} holds label {int(bad[0])}, outside [0, {len(self.classes)}] '
                                f'(ADE20K: 0 = other, 1..{len(self.classes)} = the classes)')
            return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255
        bad = label[(label >= len(self.classes)) & (label != IGNORE_INDEX)]
        if bad.size:
            raise UserError(f'mask {mask_path} holds label {int(bad[0])}, outside [0, {len(self.classes)}) and not '
                            f'{IGNORE_INDEX} (void)')
        return label

    def check_labels(self):
        """Every mask of the split read once: a bad label is reported before training, not when evaluating."""
        for _, mask_path in self.samples:
            try:
                label = np.array(Image.open(mask_path))
            except OSError as e:
                raise UserError(f'cannot read {mask_path}: {e}') from e
            self.check_label(label, mask_path)

    def __getitem__(self, index):
        img, label = self.load(index)
        return self.transform(img, label) if self.transform is not None else (img, label)


def to_tensor(img, label):
    """PIL image, label array -> normalized float [3, H, W], long [H, W]"""
    x = TF.normalize(TF.to_tensor(img), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return x, torch.from_numpy(label.astype(np.int64))


def rescale_size(w, h, base_size, ratio=1.0):
    """mmseg's keep-ratio Resize to img_scale (4 * base, base) * ratio: the short side becomes base * ratio
    unless the long side would exceed 4 * base * ratio. -> (new_w, new_h)"""
    scale = min(base_size * ratio / min(w, h), 4 * base_size * ratio / max(w, h))
    return max(int(w * scale + 0.5), 1), max(int(h * scale + 0.5), 1)


class TrainTransform:
    """Random rescale (ratio_range x base_size), random crop (no class above cat_max_ratio of the crop, up to
    10 tries), horizontal flip, photometric distortion, normalize, pad to the crop (image 0, label 255).
    Random draws use torch's RNG, so seeds and DataLoader workers cover them."""

    def __init__(self, crop_size, base_size, ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
        self.crop, self.base, self.ratio_range, self.cat_max_ratio = crop_size, base_size, ratio_range, cat_max_ratio

    def _crop_box(self, label):
        h, w = label.shape
        ch, cw = min(self.crop, h), min(self.crop, w)
        for _ in range(10):
            y, x = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
            counts = np.bincount(label[y:y + ch, x:x + cw].ravel(), minlength=256)[:IGNORE_INDEX]
            if len(counts[counts > 0]) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return x, y, cw, ch

    def __call__(self, img, label):
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        size = rescale_size(*img.size, self.base, ratio)
        img = img.resize(size, Image.BILINEAR)
        label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
        x, y, cw, ch = self._crop_box(label)
        img, label = img.crop((x, y, x + cw, y + ch)), label[y:y + ch, x:x + cw]
        if float(torch.rand(())) < 0.5:
            img, label = img.transpose(Image.FLIP_LEFT_RIGHT), label[:, ::-1]
        img = photometric_distortion(TF.to_tensor(img))
        x = TF.normalize(img, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        y_ = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        pad = (0, self.crop - cw, 0, self.crop - ch)
        return F.pad(x, pad, value=0.), F.pad(y_, pad, value=IGNORE_INDEX)


def photometric_distortion(img, brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18 / 180):
    """mmseg's PhotoMetricDistortion on a [3, H, W] image in [0, 1]: each step with p 0.5, contrast before or
    after the saturation/hue steps at random. Hue: mmseg's delta 18 on OpenCV's 0-180 scale = 0.1 of the circle."""
    def coin():
        return float(torch.rand(())) < 0.5

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand(()))

    if coin():
        img = (img + uniform(-brightness, brightness)).clamp(0, 1)
    contrast_first = coin()
    if contrast_first and coin():
        img = (img * uniform(*contrast)).clamp(0, 1)
    if coin():
        img = TF.adjust_saturation(img, uniform(*saturation))
    if coin():
        img = TF.adjust_hue(img, uniform(-hue, hue))
    if not contrast_first and coin():
        img = (img * uniform(*contrast)).clamp(0, 1)
    return img


class EvalTransform:
    """Keep-ratio resize to base_size (the network's input), the label map left at full resolution:
    predictions are resized back and scored on the original pixels. -> image [3, h, w], label [H, W]"""

    def __init__(self, base_size):
        self.base = base_size

    def __call__(self, img, label):
        img = img.resize(rescale_size(*img.size, self.base), Image.BILINEAR)
        return to_tensor(img, label)


def shard_sampler(n, rank, world_size):
    """Evaluation indices of one process: rank, rank + world, ... (no padding, so no image counts twice)."""
    return list(range(rank, n, world_size))

