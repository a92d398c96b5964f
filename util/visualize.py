"""Reconstruction panels for masked autoencoders: original | masked | reconstruction | visible pasted back.

With norm_pix_loss the model predicts each patch in its own normalized units. Turning that back into pixels
needs a mean and std per hidden patch: 'visible' (default) uses the average patch mean/std of the *visible*
patches of the same image, which the model could know; 'own' uses the hidden patch's own statistics, as the
original MAE demo does, which leaks the answer (say so in the figure).
"""
import torch

from util.datasets import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

PANELS = ('original', 'masked', 'reconstruction', 'reconstruction + visible')


def to_pixels(x):
    """ImageNet-normalized [N, 3, H, W] -> [0, 1]"""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, imgs, noise=None, mask_ratio=0.75, kept_mask_ratio=None, unnorm='visible'):
    """model: a models_mae (or models_cmae) model; imgs: [N, 3, H, W]; noise: [N, L] masking scores.
    -> dict of the four panels in pixels [N, 3, H, W], 'removed' [N, L] (1 = hidden), 'predicted' [N, L]."""
    was_training = model.training
    model.eval()
    # forward_masked: the pixel branch alone, also for subclasses whose forward takes more views (CMAE)
    _, pred, predicted = model.forward_masked(imgs, mask_ratio, noise, kept_mask_ratio)[:3]
    model.train(was_training)
    pred = pred.float()
    target = model.patchify(imgs)
    length = target.shape[1]
    if noise is None:
        raise ValueError('pass the noise used, so that the visible patches are known')
    keep = int(length * (1 - mask_ratio))
    removed = torch.ones_like(predicted)
    removed.scatter_(1, noise.argsort(1)[:, :keep], 0.)
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        if unnorm == 'own':
            pred = pred * (var + 1e-6) ** .5 + mean
        else:
            vis = (1 - removed).unsqueeze(-1)
            n_vis = vis.sum(1, keepdim=True).clamp_min(1)
            img_mean = (mean * vis).sum(1, keepdim=True) / n_vis
            img_std = (((var + 1e-6) ** .5) * vis).sum(1, keepdim=True) / n_vis
            pred = pred * img_std + img_mean
    pred = pred * predicted.unsqueeze(-1)  # zeros (the mean colour) where nothing was predicted
    vis = (1 - removed).unsqueeze(-1)
    return {'original': to_pixels(imgs),
            'masked': to_pixels(model.unpatchify(target * vis)),
            'reconstruction': to_pixels(model.unpatchify(pred)),
            'reconstruction + visible': to_pixels(model.unpatchify(target * vis + pred * (1 - vis))),
            'removed': removed, 'predicted': predicted}


def grid_image(panels):
    """One [3, N*H, 4*W] image: a row per sample, the four panels side by side (for TensorBoard)."""
    rows = [torch.cat([panels[p][i] for p in PANELS], dim=2) for i in range(panels['original'].shape[0])]
    return torch.cat(rows, dim=1)


def save_figure(panels, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = panels['original'].shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.6), squeeze=False)
    for i in range(n):
        for j, p in enumerate(PANELS):
            axes[i, j].imshow(panels[p][i].permute(1, 2, 0).cpu().numpy())
            axes[i, j].axis('off')
            if i == 0:
                axes[i, j].set_title(p, fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_noise(mask_gen, n, mask_ratio, seed, device):
    """The masking scores of a figure: a function of `seed` alone, drawn from private generators, so that the
    training's RNG streams (the CPU's and every GPU's default generator) are never re-seeded or advanced.
    (torch.manual_seed re-seeds all CUDA generators, which a CPU-only fork_rng does not restore.)"""
    if mask_gen.mask_type == 'random':  # MaskGenerator draws these from the global RNG: use our own on the device
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(n, mask_gen.num_patches, generator=g, device=device)  # = torch.manual_seed(seed); rand
    gen = type(mask_gen)(mask_gen.mask_type, mask_gen.grid, mask_ratio, seed=seed, device=device,
                         patterns=mask_gen.patterns)  # a fresh masking.MaskGenerator: its own CPU generator
    return gen(n)


def log_to_tensorboard(writer, model, imgs, mask_gen, mask_ratio, kept_mask_ratio, epoch, seed=0):
    """Reconstruction grid and the masks of a fixed batch; the training RNG streams are left untouched."""
    noise = figure_noise(mask_gen, imgs.shape[0], mask_ratio, seed, imgs.device)
    panels = reconstruct(model, imgs, noise, mask_ratio, kept_mask_ratio)
    writer.add_image('reconstruction', grid_image(panels).cpu(), epoch)
    visible = (1 - panels['removed']).view(-1, 1, *mask_gen.grid)
    writer.add_images('masks (white = visible)', visible.cpu(), epoch)
