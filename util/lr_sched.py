"""Per-iteration learning rate: linear warmup, then half-cycle cosine to min_lr."""
import math


def lr_at(epoch, lr, min_lr, warmup_epochs, epochs):
    """epoch: fractional epoch (epoch + it / len(loader))."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch, args):
    """Sets every group's lr (times its lr_scale, if any) for a fractional epoch; returns the base lr."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr


def momentum_at(epoch, base, epochs, cosine=False):
    """EMA momentum: constant `base`, or with cosine=True ramped from base to 1 along a half cosine."""
    if not cosine:
        return base
    return 1. - (1. - base) * (math.cos(math.pi * min(epoch / epochs, 1.)) + 1) / 2
