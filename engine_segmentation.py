"""One segmentation training epoch, and evaluation (mIoU, per-class IoU, aAcc) by whole image or sliding window.

The training step does not wait for the device: losses stay on it and are read every --print_freq steps
(non-finite check, printing, TensorBoard) and at the end of the epoch.
"""
import itertools
import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import util.meters as meters
import util.misc as misc
from util.datasets import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from util.seg_datasets import IGNORE_INDEX
from util.seg_metrics import confusion_matrix, format_table, segmentation_metrics


def poly_lr(it, lr, min_lr, warmup_iters, total_iters, power=1.0):
    """mmseg's schedule: poly decay over all iterations, scaled by a linear warmup from 0 over warmup_iters."""
    lr_it = (lr - min_lr) * (1 - min(it, total_iters) / total_iters) ** power + min_lr
    return lr_it * it / warmup_iters if it < warmup_iters else lr_it


def segmentation_loss(model, images, labels, aux_weight):
    """Cross-entropy (ignore 255) of the decode head + aux_weight x that of the auxiliary head. -> loss, logs"""
    out = model(images, with_aux=aux_weight > 0)
    logits, aux = out if isinstance(out, tuple) else (out, None)
    loss_main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    if aux is None:
        return loss_main, {'loss_main': loss_main}
    loss_aux = F.cross_entropy(aux.float(), labels, ignore_index=IGNORE_INDEX)
    return loss_main + aux_weight * loss_aux, {'loss_main': loss_main, 'loss_aux': loss_aux}


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, args, log_writer=None):
    """args.iters_per_epoch and args.total_iters set the schedule; returns the epoch's mean losses. The losses
    are read every --print_freq steps and at the end (util.meters.StepReader: one all-reduce under DDP,
    the non-finite check naming the step, TensorBoard 'train/loss*' and 'lr' per optimizer step)."""
    model.train(True)
    metric_logger = meters.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', meters.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    first = epoch * args.iters_per_epoch
    total = min(args.iters_per_epoch, args.total_iters - first)
    reader = meters.StepReader(args, epoch, args.iters_per_epoch, metric_logger, log_writer, tag_prefix='train/')
    optimizer.zero_grad()
    batches = itertools.islice(data_loader, total)
    for step, (images, labels) in enumerate(metric_logger.log_every(batches, args.print_freq, f'Epoch: [{epoch}]', total)):
        it = first + step
        if step % args.accum_iter == 0:
            lr = poly_lr(it, args.lr, args.min_lr, args.warmup_iters, args.total_iters, args.poly_power)
            for g in optimizer.param_groups:
                g['lr'] = lr * g.get('lr_scale', 1.0)
        images = images.to(args.device, non_blocking=True)
        labels = labels.to(args.device, non_blocking=True)
        update = (step + 1) % args.accum_iter == 0 or step == total - 1  # the epoch's tail is applied too
        # no all-reduce mid-group: DDP decides at forward time, so the forward runs inside no_sync too
        with model.no_sync() if args.distributed and not update else nullcontext():
            with misc.autocast(args):
                loss, logs = segmentation_loss(model, images, labels, args.aux_weight)
            loss_scaler(loss / args.accum_iter, optimizer, clip_grad=args.clip_grad,
                        parameters=[p for p in model.parameters() if p.requires_grad], update_grad=update)
        if update:
            optimizer.zero_grad()
        metric_logger.update(lr=lr)
        reader.record(step, lr, update, loss=loss.detach(), **{k: v.detach() for k, v in logs.items()})
        if step % args.print_freq == 0 or step == total - 1:  # the read: the one host-device synchronisation
            reader.read()
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def slide_logits(model, img, num_classes, crop, stride):
    """Sliding-window inference (mmseg's slide mode): windows of `crop` every `stride`, the last flush with the
    border, overlapping logits averaged. img: [1, 3, H, W] -> [1, K, H, W]"""
    _, _, h, w = img.shape
    rows = max(math.ceil((h - crop) / stride), 0) + 1
    cols = max(math.ceil((w - crop) / stride), 0) + 1
    logits = img.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def batch_by_size(batch, device):
    """[(image [3, h, w], label [H, W])] -> [(images [n, 3, h, w], labels [n, H, W])], one entry per size"""
    groups = {}
    for img, label in batch:
        groups.setdefault((img.shape, label.shape), []).append((img, label))
    return [(torch.stack([g[0] for g in grp]).to(device, non_blocking=True),
             torch.stack([g[1] for g in grp]).to(device, non_blocking=True)) for grp in groups.values()]


@torch.no_grad()
def predict(model, img, size, args):
    """img: [n, 3, h, w] (resized inputs) -> class maps [n, H, W] at the labels' size"""
    with misc.autocast(args):
        if args.slide:
            crop = args.crop_size or args.input_size
            logits = torch.cat([slide_logits(model, x[None], args.nb_classes, crop, args.stride) for x in img])
        else:
            logits = model(img).float()
    return F.interpolate(logits.float(), size=size, mode='bilinear', align_corners=False).argmax(1)


@torch.no_grad()
def evaluate(data_loader, model, args, classes, figure_path=None, num_figure=4):
    """Confusion matrix over the split (summed across processes) -> prints '* mIoU x aAcc y' and the per-class
    table; returns the metrics. Writes image | ground truth | prediction rows of the first images to figure_path.
    Whole images differ in size (ADE20K): cuDNN's autotuning, which would re-tune every convolution for each new
    size, is off while evaluating."""
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        return _evaluate(data_loader, model, args, classes, figure_path, num_figure)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _evaluate(data_loader, model, args, classes, figure_path, num_figure):
    model.eval()
    if misc.get_world_size() > 1:  # DDP keeps each rank's BatchNorm statistics of its last step: use rank 0's,
        for b in model.buffers():  # which are the ones in the checkpoint
            dist.broadcast(b, 0)
    conf = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=args.device)
    rows = []
    for i, batch in enumerate(data_loader):  # a list of (image, label); images of one size run together
        for img, label in batch_by_size(batch, args.device):
            preds = predict(model, img, label.shape[1:], args)
            for pred, lab, im in zip(preds, label, img):
                conf += confusion_matrix(pred, lab, len(classes))
                if figure_path and len(rows) < num_figure:
                    rows.append((im.cpu(), lab.cpu(), pred.cpu()))
        if i % 50 == 0:
            print(f'Test: [{i}/{len(data_loader)}]')
    if misc.get_world_size() > 1:
        dist.all_reduce(conf)
    metrics = segmentation_metrics(conf)
    metrics['confusion'] = conf.cpu().tolist()
    print(f"* mIoU {metrics['miou']:.2f} aAcc {metrics['aacc']:.2f} mAcc {metrics['macc']:.2f} "
          f"({int(conf.sum())} labelled pixels)")
    print(format_table(classes, metrics))
    if figure_path and rows and misc.is_main_process():
        save_figure(rows, classes, figure_path)
    return metrics


def palette(num_classes):
    """Distinct colours for the classes (tab20 first, then fixed random ones); void is black."""
    base = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
            (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
            (219, 219, 141), (158, 218, 229)]
    rng = np.random.RandomState(0)
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:num_classes] = (base + [tuple(rng.randint(0, 256, 3)) for _ in range(max(num_classes - 20, 0))])[:num_classes]
    return colours


def save_figure(rows, classes, path, height=180):
    """rows: [(normalized image [3, h, w], label [H, W], prediction [H, W])] -> one PNG, a row per image, and a
    legend of the class colours (void black)."""
    from PIL import ImageDraw
    colours = palette(len(classes))
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    panels = []
    for img, label, pred in rows:
        h, w = label.shape
        rgb = ((img * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        rgb = np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        gt, pr = colours[label.numpy().astype(np.uint8)], colours[pred.numpy().astype(np.uint8)]
        row = Image.fromarray(np.concatenate([rgb, gt, pr], axis=1))
        panels.append(row.resize((int(row.width * height / h), height), Image.NEAREST))
    width, per_row = max(p.width for p in panels), 6
    legend_h = 16 * -(-(len(classes) + 1) // per_row)
    fig = Image.new('RGB', (width, sum(p.height for p in panels) + legend_h), (255, 255, 255))
    for i, p in enumerate(panels):
        fig.paste(p, (0, i * height))
    draw = ImageDraw.Draw(fig)
    for i, (name, colour) in enumerate([*zip(classes, colours.tolist()), ('void', [0, 0, 0])]):
        x, y = (i % per_row) * width // per_row + 4, len(panels) * height + (i // per_row) * 16 + 3
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(colour))
        draw.text((x + 14, y - 1), name, fill=(0, 0, 0))
    fig.save(path)
    print(f'wrote {path} (image | ground truth | prediction)')
