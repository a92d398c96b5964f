"""Weighted k-NN evaluation of frozen encoder features (cosine similarity, votes exp(sim / T)).

    python main_knn.py --finetune mae_pretrain_vit_base.pth --data_path /imagenet
    torchrun --nproc_per_node=2 main_knn.py --finetune runs/ --output knn.md
Several checkpoints (or a folder: every *.pth in it; HF ViTMAE folders and timm files too) are evaluated on one
decoding of the data and written as a table with --output; no --finetune: the untrained encoder. --model and
--input_size default to the checkpoint's (the first one's input_size), else vit_base_patch16 at 224.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import util.misc as misc
import models_vit
from util.convert import is_hf_folder
from util.datasets import build_image_dataset, eval_transform
from util.pretrained import load_encoder, read_checkpoint

DEFAULTS = {'model': 'vit_base_patch16', 'input_size': 224}  # when neither a flag nor the checkpoint says


def get_args_parser():
    parser = argparse.ArgumentParser('k-NN evaluation of frozen features', add_help=True)
    parser.add_argument('--model', default=None,
                        help="fine-tune factory (or the mae_vit_* name; default: the checkpoint's, else "
                             "vit_base_patch16); 'pixels': the raw-pixel floor (no encoder)")
    parser.add_argument('--pixel_size', default=32, type=int,
                        help='--model pixels: images average-pooled to this size, flattened and mean-centred')
    parser.add_argument('--finetune', '--checkpoint', dest='finetune', default=[''], nargs='*',
                        help='pretrained checkpoints (ours, official, HF ViTMAE, timm) and/or folders of *.pth; '
                             'features of the data decoded once; none: untrained')
    parser.add_argument('--input_size', default=None, type=int, help="default: the first checkpoint's, else 224")
    parser.add_argument('--pool', default='avg', choices=['avg', 'cls'], help='avg: fc_norm(mean of patch tokens); cls: norm(x)[:, 0]')
    parser.add_argument('--ks', default=[10, 20, 100, 200], type=int, nargs='+', help='numbers of neighbours')
    parser.add_argument('--temperature', default=0.07, type=float, help='vote weight exp(sim / T)')
    parser.add_argument('--batch_size', default=128, type=int, help='extraction batch per process')
    parser.add_argument('--data_path', default='../shared/data/imagenette2-224', help='ImageFolder root with train/ and val/')
    parser.add_argument('--subset', default=0, type=int, help='> 0: a fixed, class-balanced subset of train')
    parser.add_argument('--val_subset', default=0, type=int, help='> 0: a fixed, class-balanced subset of val')
    parser.add_argument('--cache_data', action='store_true', help='decode the images once and keep them in memory')
    parser.add_argument('--cache_size', default=0, type=int)
    parser.add_argument('--output', default='', help='write the results as a markdown table here')
    parser.add_argument('--probe_epochs', default=0, type=int,
                        help='> 0: also a quick linear probe (BatchNorm + Linear, SGD) on the frozen, non-augmented features')
    return misc.add_dist_args(parser)


class Indexed(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def raw_pixels(x, size):
    """The floor every encoder must clear: x: [N, 3, H, W] -> [N, 3 * size * size], each row mean-centred."""
    f = F.adaptive_avg_pool2d(x, size).flatten(1)
    return f - f.mean(dim=1, keepdim=True)


def gather_rows(t):
    """[n, ...] on every process (the same n) -> [world_size * n, ...] in rank order (one all_gather_into_tensor)."""
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    gather = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor  # new name; the old warns
    gather(out, t.contiguous())
    return out


@torch.no_grad()
def extract_features(embed, dataset, args):
    """embed: images [N, 3, H, W] -> features [N, D].
    -> L2-normalized features [len, D] and labels [len] on args.device, identical on every process (sharded
    extraction). The features stay on the device: nothing is read on the host per batch."""
    sampler = torch.utils.data.DistributedSampler(Indexed(dataset), num_replicas=args.world_size, rank=args.rank,
                                                  shuffle=False)
    loader = torch.utils.data.DataLoader(Indexed(dataset), sampler=sampler, batch_size=args.batch_size,
                                         num_workers=args.num_workers,
                                         pin_memory=getattr(args, 'pin_mem', False) and args.device.type == 'cuda')
    feats, labels, index = [], [], []
    for x, y, i in loader:
        with misc.autocast(args):
            f = embed(x.to(args.device, non_blocking=True))
        feats.append(f.float())
        labels.append(y)
        index.append(i)
    feats = torch.cat(feats)
    labels, index = (torch.cat(t).to(args.device) for t in (labels, index))  # once, not per batch
    if args.distributed:
        # every shard has the same length: the sampler pads the sharded order by repeating its first samples, and
        # rank r's j-th sample is at position j * world_size + r of that order; positions >= len are the padding,
        # dropped so that each sample is placed exactly once
        n, world = len(index), args.world_size
        feats, labels, index = (gather_rows(t) for t in (feats, labels, index))
        pos = torch.arange(n)[None, :] * world + torch.arange(world)[:, None]  # [rank, j], rank-major as gathered
        keep = (pos.flatten() < len(dataset)).nonzero().flatten().to(args.device)
        feats, labels, index = (t.index_select(0, keep) for t in (feats, labels, index))
    out_f = feats.new_zeros(len(dataset), feats.shape[1])
    out_y = labels.new_zeros(len(dataset))
    out_f[index], out_y[index] = feats, labels
    return F.normalize(out_f, dim=1), out_y


def knn_counts(train_f, train_y, test_f, test_y, ks, temperature=0.07, num_classes=None, chunk=256, rank=0,
               world_size=1):
    """Weighted k-NN on L2-normalized features, on their device: -> correct counts [len(ks), 2] (top1, top5) over
    the test chunks rank, rank + world_size, ... of `chunk` rows (the same chunks whatever the world size, so
    a sum over the ranks equals one process's counts exactly)."""
    num_classes = num_classes or int(train_y.max()) + 1
    kmax = min(max(ks), len(train_f))
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=test_f.device)
    for s in range(rank * chunk, len(test_f), world_size * chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(kmax, dim=1)  # sorted, most similar first
        votes_w = (sim / temperature).exp()
        neighbours = train_y[idx]  # [b, kmax]
        target = test_y[s:s + chunk]
        for j, k in enumerate(ks):
            kk = min(k, kmax)
            scores = torch.zeros(len(target), num_classes, device=votes_w.device, dtype=votes_w.dtype)
            scores.scatter_add_(1, neighbours[:, :kk], votes_w[:, :kk])
            top = scores.topk(min(5, num_classes), dim=1).indices
            correct[j, 0] += (top[:, 0] == target).sum()
            correct[j, 1] += (top == target[:, None]).any(dim=1).sum()
    return correct


def knn_classify(train_f, train_y, test_f, test_y, ks, temperature=0.07, num_classes=None, chunk=256,
                 distributed=False):
    """Weighted k-NN on L2-normalized features -> {k: (top1 %, top5 %)}. distributed=True: every process takes
    its share of the test chunks (all must hold the same features) and the counts are summed; one host read."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = knn_counts(train_f, train_y, test_f, test_y, ks, temperature, num_classes, chunk, rank, world)
    if distributed:
        dist.all_reduce(correct)
    correct = correct.tolist()
    return {k: (100. * c1 / len(test_f), 100. * c5 / len(test_f)) for k, (c1, c5) in zip(ks, correct)}


def probe_on_features(train_f, train_y, val_f, val_y, num_classes, epochs, batch_size=256, lr=0.1, seed=0):
    """A quick linear probe on extracted features (MAE's head, BatchNorm(affine=False) + Linear, trained with SGD,
    momentum 0.9, cosine lr, no augmentation); -> val top-1 %."""
    import math
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same initialisation and order on any device
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6),
                               torch.nn.Linear(train_f.shape[1], num_classes))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head[1].bias)
    head.to(train_f.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    steps = epochs * (len(train_f) // batch_size)
    for step in range(steps):
        if step % (len(train_f) // batch_size) == 0:
            perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
        i = perm[(step % (len(train_f) // batch_size)) * batch_size:][:batch_size]
        for group in opt.param_groups:
            group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = torch.nn.functional.cross_entropy(head(train_f[i]), train_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return 100. * (head(val_f).argmax(1) == val_y).float().mean().item()


def name(path, args):
    return os.path.basename(os.path.normpath(path)) if path else ('pixels' if args.model == 'pixels' else 'untrained')


def evaluate_checkpoint(path, train_set, val_set, args):
    if args.model == 'pixels':
        if path:
            raise misc.UserError('--model pixels takes no --finetune checkpoint')
        embed = lambda x: raw_pixels(x, args.pixel_size)  # noqa: E731
    else:
        state, stored = read_checkpoint(path, models_vit.CONFIGS) if path else (None, {})
        model_name = args.model or stored.get('model') or DEFAULTS['model']
        torch.manual_seed(args.seed)  # the untrained encoder is reproducible
        model = models_vit.create_vit(model_name, img_size=args.input_size, num_classes=0,
                                      global_pool=args.pool == 'avg')
        print(f'{name(path, args)}: {models_vit.vit_name(model_name)} at {args.input_size} px')
        if path:
            load_encoder(model, path, state)
        model.to(args.device).eval()
        embed = lambda x: models_vit.forward_features_pooled(model, x, args.pool)  # noqa: E731
    train_f, train_y = extract_features(embed, train_set, args)
    val_f, val_y = extract_features(embed, val_set, args)
    res = knn_classify(train_f, train_y, val_f, val_y, args.ks, args.temperature, len(train_set.classes),
                       distributed=args.distributed)  # each process searches its share of the val images
    for k, (t1, t5) in res.items():
        print(f'{name(path, args)}: k-NN k={k} top1 {t1:.2f} top5 {t5:.2f}')
    if args.probe_epochs:  # trained once, on rank 0, and its accuracy sent to the others
        probe = [probe_on_features(train_f, train_y, val_f, val_y, len(train_set.classes), args.probe_epochs)
                 if misc.is_main_process() else None]
        if args.distributed:
            dist.broadcast_object_list(probe, src=0)
        res['probe'] = probe[0]
        print(f'{name(path, args)}: linear probe ({args.probe_epochs} epochs on features) '
              f'top1 {res["probe"]:.2f}')
    return res


def main(args):
    misc.init_distributed_mode(args)
    misc.resolve_amp(args)
    paths = []
    for c in args.finetune or ['']:
        if c and os.path.isdir(c) and not is_hf_folder(c):
            found = sorted((os.path.join(c, f) for f in os.listdir(c) if f.endswith('.pth')), key=os.path.getmtime)
            if not found:
                raise misc.UserError(f'no *.pth checkpoints in {c}')
            paths += found
        else:
            paths.append(c)
    if args.input_size is None:
        stored = read_checkpoint(paths[0], models_vit.CONFIGS)[1] if paths[0] and args.model != 'pixels' else {}
        args.input_size = stored.get('input_size') or DEFAULTS['input_size']
        print(f'--input_size {args.input_size} ({"from " + paths[0] if stored.get("input_size") else "default"})')
    transform = eval_transform(args.input_size)
    train_set = build_image_dataset(args, 'train', transform, cache=args.cache_data)
    val_set = build_image_dataset(args, 'val', transform, cache=args.cache_data)
    print(f'k-NN: {len(train_set)} train and {len(val_set)} val images, {args.pool} features')
    rows = [(p, evaluate_checkpoint(p, train_set, val_set, args)) for p in paths]
    if args.output and misc.is_main_process():
        with open(args.output, 'w') as f:
            probe = ' linear probe top1 |' if args.probe_epochs else ''
            f.write('| checkpoint | ' + ' | '.join(f'k={k} top1 | k={k} top5' for k in args.ks) + ' |' + probe + '\n')
            f.write('|---|' + '---:|' * (2 * len(args.ks) + bool(probe)) + '\n')
            for p, res in rows:
                f.write(f'| {name(p, args)} | '
                        + ' | '.join(f'{res[k][0]:.2f} | {res[k][1]:.2f}' for k in args.ks) + ' |'
                        + (f' {res["probe"]:.2f} |' if args.probe_epochs else '') + '\n')
        print(f'wrote {args.output}')
    return rows


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
