"""ImageFolder datasets and the MAE transforms, with clear errors for unusable folders.

Corrupt or truncated images are skipped with a warning naming the file (the next image is used instead);
non-RGB images (greyscale, CMYK, palette) are converted to RGB.
"""
import multiprocessing
import os
import random
import sys

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.misc import UserError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def split_dir(data_path, split):
    """data_path/split, checked: it must exist and hold class folders with at least one image."""
    if not data_path or not os.path.isdir(data_path):
        raise UserError(f'--data_path {data_path!r} is not a folder')
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f'{data_path} has no {split}/ folder (expected the ImageFolder layout {split}/<class>/<image>)')
    classes = [d.name for d in os.scandir(root) if d.is_dir()]
    if not classes:
        raise UserError(f'{root} has no class folders (expected {split}/<class>/<image>)')
    return root


def pil_rgb_loader(path):
    with open(path, 'rb') as f:
        img = Image.open(f)
        return img.convert('RGB')  # also forces the full decode, so truncated files fail here


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that skips unreadable images with a warning instead of stopping the run."""

    def __init__(self, root, transform=None):
        try:
            super().__init__(root, transform=transform, loader=pil_rgb_loader)
        except FileNotFoundError as e:
            raise UserError(f'{root}: {e}') from e
        self.skipped = 0

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.skipped += 1
                print(f'warning: skipping unreadable image {path} ({e}); {self.skipped} skipped so far in this worker',
                      file=sys.stderr, flush=True)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise UserError(f'no readable image in {self.root}')


def pretrain_transform(input_size):
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def eval_transform(input_size):
    """Resize to input_size / (224 / 256) (bicubic), center crop."""
    size = int(input_size / (224 / 256))
    return transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


class RedrawOnValueError:
    """Runs a random transform again when it raises ValueError. timm's RandAugment ('inc1' policies) asks PIL
    for posterize(bits=0) at magnitude 10, which PIL >= 10 refuses (older PIL returned a black image); with
    'mstd0.5' that happens to about 0.1% of images. Redrawing the augmentation keeps the recipe running."""

    def __init__(self, transform, attempts=5):
        self.transform, self.attempts = transform, attempts

    def __call__(self, img):
        for attempt in range(self.attempts):
            try:
                return self.transform(img)
            except ValueError:
                if attempt == self.attempts - 1:
                    raise

    def __repr__(self):
        return f'RedrawOnValueError({self.transform!r})'


def finetune_transform(args):
    """timm's training transform: RandAugment, bicubic RandomResizedCrop, flip, RandomErasing."""
    from timm.data import create_transform
    return RedrawOnValueError(create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation='bicubic', re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD))


def linprobe_transform(input_size):
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def build_dataset(data_path, split, transform, subset=0):
    """SafeImageFolder over data_path/split; subset > 0 keeps a deterministic, class-balanced subset."""
    ds = SafeImageFolder(split_dir(data_path, split), transform=transform)
    if not ds.samples:
        raise UserError(f'{ds.root} has class folders but no images')
    if subset and subset < len(ds.samples):
        ds.samples = balanced_subset(ds.samples, len(ds.classes), subset)
        ds.targets = [t for _, t in ds.samples]
        ds.imgs = ds.samples
    return ds


def balanced_subset(samples, num_classes, n):
    """The first images of each class in sorted order, taking classes in turn until n are chosen."""
    by_class = [[s for s in samples if s[1] == c] for c in range(num_classes)]
    out, i = [], 0
    while len(out) < n:
        for c in range(num_classes):
            if i < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][i])
        i += 1
    return sorted(out, key=lambda s: (s[1], s[0]))


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also for one process) whose epoch can start part-way: `start_index` samples of
    this rank's order are skipped, so a run stopped mid-epoch continues with the samples it had not seen.
    set_epoch also updates `shared_epoch` (shared memory read by the loader workers), when there is one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index, self.shared_epoch = 0, None

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        if self.shared_epoch is not None:
            self.shared_epoch.value = epoch

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


class SeededPerSample(torch.utils.data.Dataset):
    """The dataset as persistent loader workers see it: before each sample, torch, random and numpy are seeded
    from (seed, rank, epoch, index), so a sample's augmentation depends only on those -- not on which worker
    drew it or what that worker drew before. Fresh workers per epoch got this from seeds drawn by the main
    process; workers kept across epochs would otherwise carry their streams on, and a run resumed at an epoch
    boundary would no longer equal an uninterrupted one. The epoch comes from the sampler (shared memory);
    other attributes (classes, samples, root, ...) pass through to the wrapped dataset."""

    def __init__(self, dataset, seed, rank, shared_epoch):
        self.dataset, self.seed, self.rank, self.shared_epoch = dataset, seed, rank, shared_epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        s = self.seed
        for v in (self.rank, self.shared_epoch.value, index):
            s = (s * 1_000_003 + v) % (1 << 62)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        return self.dataset[index]

    def __getattr__(self, name):
        if name.startswith('__') or name in ('dataset', 'seed', 'rank', 'shared_epoch'):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(dataset, args, shuffle=True, drop_last=True, batch_size=None, split=True):
    """DataLoader with a ResumableSampler (one process: one replica), so that the order depends only on
    (seed, epoch) and resumes reproduce it. split=False: every process reads the whole dataset. On CUDA the
    batches come in pinned memory (for non_blocking copies). With --num_workers > 0 the workers persist across
    epochs (the sampler runs in the main process, so set_epoch and start_index still apply), keep
    --prefetch_factor batches each, and see the dataset through SeededPerSample."""
    rank = args.rank if split else 0
    sampler = ResumableSampler(dataset, num_replicas=args.world_size if split else 1, rank=rank,
                               shuffle=shuffle, seed=args.seed, drop_last=drop_last and shuffle)
    workers = args.num_workers
    if workers > 0:
        sampler.shared_epoch = multiprocessing.RawValue('q', 0)
        dataset = SeededPerSample(dataset, args.seed, rank, sampler.shared_epoch)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size,
                                       num_workers=workers, pin_memory=args.pin_mem and args.device.type == 'cuda',
                                       drop_last=drop_last, persistent_workers=workers > 0,
                                       prefetch_factor=getattr(args, 'prefetch_factor', 2) if workers > 0 else None)


class CachedImageFolder(torch.utils.data.Dataset):
    """An image folder decoded once, resized to `cache_size` (shorter side, then center crop) and kept in
    memory as uint8 [3, S, S]; the transform still runs per sample on a PIL image, so random crops, flips and
    RandAugment stay random. For small datasets at low resolution, where decoding JPEGs would bound the step time."""

    def __init__(self, folder, cache_size, transform=None, num_workers=0):
        self.root, self.classes, self.transform = folder.root, folder.classes, transform
        self.samples, self.targets = folder.samples, folder.targets
        decode = transforms.Compose([transforms.Resize(cache_size, interpolation=InterpolationMode.BICUBIC),
                                     transforms.CenterCrop(cache_size), transforms.PILToTensor()])
        folder.transform = decode
        loader = torch.utils.data.DataLoader(folder, batch_size=64, num_workers=num_workers, shuffle=False)
        images = [x for x, _ in loader]
        self.images = torch.cat(images) if images else torch.zeros(0, 3, cache_size, cache_size, dtype=torch.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())  # the usual PIL transforms apply
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def build_image_dataset(args, split, transform, cache=False):
    """The dataset for a split: decoded per step from disk, or with cache=True (--cache_data) from memory at
    args.cache_size (default: input_size * 256 / 224)."""
    subset = getattr(args, 'subset', 0) if split == 'train' else getattr(args, 'val_subset', 0)
    ds = build_dataset(args.data_path, split, None if cache else transform, subset)
    if not cache:
        return ds
    size = getattr(args, 'cache_size', 0) or int(args.input_size * 256 / 224)
    return CachedImageFolder(ds, size, transform, num_workers=args.num_workers)


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from `radius` (torch RNG, so seeding covers it)."""

    def __init__(self, radius=(0.1, 2.0)):
        self.radius = radius

    def __call__(self, img):
        from PIL import ImageFilter
        r = self.radius[0] + (self.radius[1] - self.radius[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=r))


class TwoViewTransform:
    """CMAE's views: one RandomResizedCrop to input_size * 256/224 (scale 0.2-1) with one flip for both views;
    the online view is its top-left input_size crop, the target view the crop shifted by (dh, dw), each
    uniform in {0..max_shift} (31 px at 224, scaled), then color-augmented. Returns [online, target]."""

    def __init__(self, input_size, max_shift=None, color_aug=True):
        self.size = input_size
        self.big = int(round(input_size * 256 / 224))
        self.max_shift = min(round(31 * input_size / 224) if max_shift is None else max_shift, self.big - input_size)
        self.crop = transforms.Compose([
            transforms.RandomResizedCrop(self.big, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip()])
        self.color = transforms.Compose([
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5)]) if color_aug else None
        self.finish = transforms.Compose([transforms.ToTensor(),
                                          transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])

    def views(self, img):
        """-> online PIL view, target PIL view (before color), (dh, dw)"""
        img = self.crop(img)
        dh, dw = (int(v) for v in torch.randint(self.max_shift + 1, (2,)))
        online = img.crop((0, 0, self.size, self.size))
        target = img.crop((dw, dh, dw + self.size, dh + self.size))
        return online, target, (dh, dw)

    def __call__(self, img):
        online, target, _ = self.views(img)
        if self.color is not None:
            target = self.color(target)
        return [self.finish(online), self.finish(target)]


def build_classification_loaders(args, train_transform):
    """-> (train loader or None with --eval, val loader) of an ImageFolder for fine-tuning and linear probing."""
    dataset_val = build_image_dataset(args, 'val', eval_transform(args.input_size), cache=args.cache_data)
    loader_val = build_loader(dataset_val, args, shuffle=False, drop_last=False, split=args.dist_eval)
    if args.eval:
        return None, loader_val
    dataset_train = build_image_dataset(args, 'train', train_transform, cache=args.cache_data)
    if len(dataset_train.classes) > args.nb_classes:
        raise UserError(f'{len(dataset_train.classes)} classes in the data but --nb_classes {args.nb_classes}')
    print(f'train: {len(dataset_train)} images, val: {len(dataset_val)} images')
    return build_loader(dataset_train, args), loader_val
