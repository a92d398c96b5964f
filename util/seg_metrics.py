"""Semantic segmentation metrics from a confusion matrix (mmseg's definitions).

IoU_c = TP / (TP + FP + FN); a class absent from both the labels and the predictions has IoU nan and is left
out of the mean. aAcc = correct / labelled pixels; Acc_c = TP / labelled pixels of class c.
Pixels labelled `ignore_index` count nowhere.
"""
import math

import torch


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """pred, target: integer tensors of one shape -> [K, K] int64 counts, rows = label, columns = prediction.
    Ignored pixels go to one extra bin that is dropped (no boolean indexing: nothing waits for the device)."""
    k2 = num_classes * num_classes
    idx = torch.where(target != ignore_index, target.long() * num_classes + pred.long(), k2).flatten()
    counts = torch.zeros(k2 + 1, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    return counts[:k2].view(num_classes, num_classes)


def segmentation_metrics(conf):
    """conf: [K, K] counts -> {'iou': [K], 'acc': [K], 'miou', 'macc', 'aacc'} (floats; % units, nan where undefined)"""
    conf = conf.double().cpu()
    tp = conf.diag()
    labelled, predicted = conf.sum(1), conf.sum(0)
    union = labelled + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan)) * 100
    acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, math.nan)) * 100
    total = labelled.sum()
    return {'iou': iou.tolist(), 'acc': acc.tolist(), 'miou': float(iou.nanmean()), 'macc': float(acc.nanmean()),
            'aacc': float(tp.sum() / total * 100) if total > 0 else math.nan}


def format_table(classes, metrics):
    """Per-class IoU / Acc as a Markdown table."""
    rows = [f'| {name} | {iou:.2f} | {acc:.2f} |' for name, iou, acc in zip(classes, metrics['iou'], metrics['acc'])]
    return '\n'.join(['| class | IoU | Acc |', '|---|---:|---:|', *rows])
