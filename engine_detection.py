"""One detection training epoch, and COCO evaluation (box / mask AP) with a figure of predictions.

The training step does not wait for the device: the losses stay on it and are read every --print_freq steps
(non-finite check, printing, TensorBoard) and at the end of the epoch. (torchvision's detector itself reads
sizes on the host inside its forward pass -- proposal selection -- which no engine can avoid.)
"""
import itertools
import json
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import util.meters as meters
import util.misc as misc
from util import coco_eval


def milestones(total_iters):
    """ViTDet's lr steps: 24/27 and 26/27 of the iterations (163889 and 177546 of 184375)."""
    return round(total_iters * 24 / 27), round(total_iters * 26 / 27)


def step_lr(it, lr, warmup_iters, total_iters, warmup_factor=0.001):
    """detectron2's schedule: lr x 0.1 at each milestone passed, times a linear warmup from warmup_factor to 1
    over the first warmup_iters iterations."""
    factor = 0.1 ** sum(it >= m for m in milestones(total_iters))
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return lr * factor


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, args, log_writer=None):
    """args.iters_per_epoch and args.total_iters set the schedule; returns the epoch's mean losses. The loss
    terms (loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg) and their sum are
    queued on the device and read by util.meters.StepReader every --print_freq steps (TensorBoard 'train/<term>', 'lr')."""
    model.train(True)
    metric_logger = meters.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', meters.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    first = epoch * args.iters_per_epoch
    total = min(args.iters_per_epoch, args.total_iters - first)
    reader = meters.StepReader(args, epoch, args.iters_per_epoch, metric_logger, log_writer, tag_prefix='train/')
    params = [p for p in model.parameters() if p.requires_grad]
    batches = itertools.islice(data_loader, total)
    optimizer.zero_grad()
    for step, (images, targets) in enumerate(metric_logger.log_every(batches, args.print_freq, f'Epoch: [{epoch}]', total)):
        if step % args.accum_iter == 0:  # the schedule counts loader steps
            lr = step_lr(first + step, args.lr, args.warmup_iters, args.total_iters, args.warmup_factor)
            for g in optimizer.param_groups:
                g['lr'] = lr * g.get('lr_scale', 1.0)
        images, targets = to_device(images, targets, args.device)
        update = (step + 1) % args.accum_iter == 0 or step == total - 1  # the epoch's tail is applied too
        sync_ctx = model.no_sync() if args.distributed and not update else nullcontext()  # no all-reduce mid-group
        with sync_ctx:
            with misc.autocast(args):
                losses = model(images, targets)
            loss = sum(losses.values())
            loss_scaler(loss / args.accum_iter, optimizer, clip_grad=args.clip_grad, parameters=params,
                        update_grad=update)
        if update:
            optimizer.zero_grad()
        metric_logger.update(lr=lr)
        reader.record(step, lr, update, loss=loss.detach(), **{k: v.detach() for k, v in losses.items()})
        if step % args.print_freq == 0 or step == total - 1:  # the read: the one host-device synchronisation
            reader.read()
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(model, data_loader, dataset, args, results_path=None, figure_path=None, num_figure=4):
    """Detections of every process's images -> one COCO results list on rank 0 (written to results_path),
    evaluated there with pycocotools against the annotation file: prints '* bbox AP ...', the 12 COCO numbers
    of each type and the per-class table. Returns {type: {'stats', 'per_class'}} on every process."""
    model.eval()
    masks = hasattr(model.roi_heads, 'mask_head') and model.roi_heads.mask_head is not None
    results, rows = [], []
    for i, (images, targets) in enumerate(data_loader):
        images, _ = to_device(images, [], args.device)
        with misc.autocast(args):
            outputs = model(images)
        for img, t, out in zip(images, targets, outputs):
            out = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}  # bf16 -> fp32
            results += coco_eval.to_coco_results(t['image_id'], out, dataset.label_to_cat)
            if figure_path and len(rows) < num_figure:
                rows.append((img.cpu(), t['image_id'], out))
        if i % 50 == 0:
            print(f'Test: [{i}/{len(data_loader)}]')
    if misc.get_world_size() > 1:
        gathered = [None] * misc.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = None
    if misc.is_main_process():
        results.sort(key=lambda r: r['image_id'])  # stable: each image's records keep their order
        if results_path:
            with open(results_path, 'w', encoding='utf-8') as f:
                json.dump(results, f)
            print(f'wrote {len(results)} detections to {results_path}')
        gt = coco_eval.coco_from_dict(dataset.data)
        metrics = coco_eval.evaluate(gt, results, ('bbox', 'segm') if masks else ('bbox',), img_ids=dataset.ids)
        print(coco_eval.summary_line(metrics) + f' ({len(dataset.ids)} images, {len(results)} detections)')
        print(coco_eval.format_stats(metrics))
        names = {c: n for c, n in zip(dataset.label_to_cat.values(), dataset.classes)}
        print(coco_eval.format_table(metrics, names))
        if figure_path and rows:
            save_figure(rows, dataset, figure_path, args.figure_score)
    if misc.get_world_size() > 1:
        box = [metrics]
        dist.broadcast_object_list(box, 0)
        metrics = box[0]
    return metrics


def colours(n):
    rng = np.random.RandomState(1)
    base = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]
    return (base + [tuple(int(c) for c in rng.randint(40, 256, 3)) for _ in range(max(n - len(base), 0))])[:n]


def draw(img, boxes, labels, masks, names, scores=None):
    """img: uint8 [H, W, 3]; boxes xyxy; masks bool [N, H, W] or None -> PIL image with boxes, masks, names."""
    img = img.astype(np.float32)
    palette = colours(len(names) + 1)
    for k, lab in enumerate(labels):
        if masks is not None:
            img[masks[k]] = 0.5 * img[masks[k]] + 0.5 * np.array(palette[lab])
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for k, (box, lab) in enumerate(zip(boxes, labels)):
        d.rectangle([float(v) for v in box], outline=palette[lab], width=2)
        text = names[lab - 1] + (f' {scores[k]:.2f}' if scores is not None else '')
        d.text((float(box[0]) + 2, float(box[1]) + 1), text, fill=(255, 255, 255))
    return pil


def save_figure(rows, dataset, path, min_score=0.5, height=240):
    """One row per image, `height` px: ground truth | predictions with score >= min_score (boxes, masks, class
    names, scores)."""
    from util.det_datasets import decode_mask
    panels = []
    for img, iid, out in rows:
        h, w = img.shape[1:]
        s, size = height / h, (max(round(w * height / h), 1), height)
        rgb = np.array(Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).resize(size, Image.BILINEAR))

        def fit(masks):  # [N, H, W] bool -> [N, height, width]
            return None if masks is None else np.stack([np.array(Image.fromarray(m.astype(np.uint8)).resize(
                size, Image.NEAREST)) > 0 for m in masks]) if len(masks) else np.zeros((0, height, size[0]), bool)
        anns = [a for a in dataset.anns.get(iid, []) if not a.get('iscrowd')]
        gt_boxes = [[s * a['bbox'][0], s * a['bbox'][1], s * (a['bbox'][0] + a['bbox'][2]), s * (a['bbox'][1] + a['bbox'][3])]
                    for a in anns]
        gt_masks = [decode_mask(a['segmentation'], h, w) > 0 for a in anns] if all('segmentation' in a for a in anns) else None
        keep = out['scores'] >= min_score
        pred_masks = out['masks'][keep][:, 0].numpy() > 0.5 if 'masks' in out else None
        left = draw(rgb, gt_boxes, [dataset.cat_to_label[a['category_id']] for a in anns], fit(gt_masks), dataset.classes)
        right = draw(rgb, (out['boxes'][keep] * s).tolist(), out['labels'][keep].tolist(), fit(pred_masks),
                     dataset.classes, out['scores'][keep].tolist())
        row = Image.new('RGB', (2 * size[0] + 4, height), (255, 255, 255))
        row.paste(left, (0, 0))
        row.paste(right, (size[0] + 4, 0))
        panels.append(row)
    fig = Image.new('RGB', (max(p.width for p in panels), height * len(panels)), (255, 255, 255))
    for i, p in enumerate(panels):
        fig.paste(p, (0, i * height))
    fig.save(path)
    print(f'wrote {path} (ground truth | predictions with score >= {min_score})')
