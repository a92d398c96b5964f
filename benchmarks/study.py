"""Small-scale study on Imagenette at 64 px with one small ViT: equal pretraining budgets for every method, then
k-NN (k = 20, 200), a quick linear probe on frozen features and a short fine-tune, against the untrained encoder
and training from scratch. Writes RESULTS.md with the table, plots and the commands it ran.

    python benchmarks/study.py                                   # every cell (about 2 hours on 2 cores)
    python benchmarks/study.py --cells mae,untrained,scratch     # a subset; results of other cells are kept
    python benchmarks/study.py --rerun mae                       # pretrain + k-NN of a cell again, compared
Each cell's outputs stay in --out_dir/<cell>; a cell whose summary.json exists is not run again (--force reruns
it from scratch); an interrupted cell keeps its finished pretraining and k-NN results.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # cell: extra pretraining flags
    'mae': ['--mask_type', 'random'],
    'colormae_green': ['--mask_type', 'green'],
    'colormae_red': ['--mask_type', 'red'],
    'colormae_blue': ['--mask_type', 'blue'],
    'colormae_purple': ['--mask_type', 'purple'],
    'crossmae_kept075': ['--cross_mae', '--weight_fm', '--use_input', '--kept_mask_ratio', '0.75'],
    'crossmae_kept025': ['--cross_mae', '--weight_fm', '--use_input', '--kept_mask_ratio', '0.25', '--no_lr_scale'],
    'cmae': ['--contrastive', '--mask_type', 'block2x2', '--mask_ratio', '0.65', '--proj_hidden_dim', '768',
             '--proj_dim', '128'],
}
FLOORS = {  # cell: main_knn.py model flags (None: the study's ViT, untrained); k-NN only
    'untrained': None,
    'pixels16': ['--model', 'pixels', '--pixel_size', '16'],
    'pixels32': ['--model', 'pixels', '--pixel_size', '32'],
}
CELLS = list(METHODS) + list(FLOORS) + ['scratch']
COLORS = {'mae': 'black', 'colormae_green': 'tab:green', 'colormae_red': 'tab:red', 'colormae_blue': 'tab:blue',
          'colormae_purple': 'tab:purple', 'crossmae_kept075': 'tab:orange', 'crossmae_kept025': 'tab:brown',
          'cmae': 'tab:cyan'}
FLOORS_STYLE = {'untrained': '--', 'pixels16': ':', 'pixels32': '-.'}


def get_args():
    p = argparse.ArgumentParser('Imagenette 64 px study')
    p.add_argument('--cells', default=','.join(CELLS))
    p.add_argument('--data_path', default=os.path.join(ROOT, '..', 'shared', 'data', 'imagenette2-224'))
    p.add_argument('--out_dir', default=os.path.join(ROOT, 'study_runs'))
    p.add_argument('--results', default=os.path.join(ROOT, 'RESULTS.md'))
    p.add_argument('--model', default='micro_patch8')
    p.add_argument('--input_size', default=64, type=int)
    p.add_argument('--epochs', default=7, type=int, help='pretraining epochs (the same for every method)')
    p.add_argument('--knn_every', default=0, type=int, help='k-NN every N epochs (default: epochs // 2 and the end)')
    p.add_argument('--ft_epochs', default=2, type=int)
    p.add_argument('--probe_epochs', default=30, type=int)
    p.add_argument('--num_workers', default=2, type=int)
    p.add_argument('--force', action='store_true')
    p.add_argument('--rerun', default='', help='run this method cell again (pretraining + k-NN, same command) in '
                   '<out_dir>/rerun-<cell>-seed<seed> and report the k-NN difference')
    p.add_argument('--seed', default=0, type=int, help='pretraining seed (the study itself uses 0)')
    # --- segmentation transfer: UperNet fine-tuned on CamVid from a cell's final checkpoint (or random init)
    p.add_argument('--seg', action='store_true', help='run the segmentation column (only it) and update its section')
    p.add_argument('--seg_cells', default='mae,random', help='method cells (pretrained first if needed) and random')
    p.add_argument('--seg_seeds', default='0,1', help='fine-tuning seeds of each segmentation cell')
    p.add_argument('--seg_data', default=os.path.join(ROOT, '..', 'shared', 'data', 'camvid'))
    p.add_argument('--seg_size', default=96, type=int, help='crop = short side of the rescaled CamVid frames')
    p.add_argument('--seg_epochs', default=8, type=int)
    p.add_argument('--seg_lr', default='1e-3', help='AdamW lr (absolute) of the segmentation fine-tunes')
    p.add_argument('--device', default='auto', help='auto, cuda or cpu (for every script the study runs)')
    return p.parse_args()


def run(cmd, log):
    print('$', ' '.join(cmd), flush=True)
    t = time.time()
    with open(log, 'a') as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t


def device_args(a):
    """--device for every script the study runs (left out for auto: the commands stay as they were)"""
    return [] if a.device == 'auto' else ['--device', a.device]


def knn(a, ckpts, out, log, model_args=None):
    """k-NN and quick probe of checkpoints (one decoding of the data; the table in `out` is not computed again).
    -> one result dict per checkpoint, the command"""
    cmd = ['main_knn.py', *(model_args or ['--model', f'vit_{a.model}']), '--input_size', str(a.input_size),
           '--data_path', a.data_path, '--cache_data', '--num_workers', str(a.num_workers), '--ks', '20', '200',
           '--probe_epochs', str(a.probe_epochs), '--output', out] + (['--checkpoint', *ckpts] if ckpts else [])
    cmd += device_args(a)
    if not os.path.exists(out):
        run(cmd, log)
    rows = [r.strip('|').split('|') for r in open(out).read().strip().splitlines()[2:]]
    return [{'knn20': float(r[1]), 'knn200': float(r[3]), 'probe': float(r[5])} for r in rows], cmd


def finetune(a, ckpt, out, log):
    cmd = ['main_finetune.py', '--model', f'vit_{a.model}', '--input_size', str(a.input_size), '--data_path',
           a.data_path, '--cache_data', '--num_workers', str(a.num_workers), '--nb_classes', '10', '--batch_size',
           '128', '--epochs', str(a.ft_epochs), '--warmup_epochs', '1', '--blr', '1e-3', '--layer_decay', '0.75',
           '--drop_path', '0.1', '--mixup', '0.8', '--cutmix', '1.0', '--output_dir', out, '--save_freq', '1000']
    cmd += (['--finetune', ckpt] if ckpt else []) + device_args(a)
    shutil.rmtree(out, ignore_errors=True)  # always a fresh fine-tune, never a resume
    wall = run(cmd, log)
    return max(r['test_acc1'] for r in map(json.loads, open(os.path.join(out, 'log.txt')))), wall, cmd


def pretrain(cell, a, out, log):
    """The method cell's pretraining (skipped when done before) -> (wall-clock seconds, command)"""
    os.makedirs(out, exist_ok=True)
    every = a.knn_every or max(a.epochs // 2, 1)
    cmd = ['main_pretrain.py', '--model', f'mae_vit_{a.model}', '--input_size', str(a.input_size), '--data_path',
           a.data_path, '--cache_data', '--num_workers', str(a.num_workers), '--norm_pix_loss', '--batch_size',
           '128', '--blr', '1.5e-3', '--epochs', str(a.epochs), '--warmup_epochs', '1', '--save_freq', str(every),
           '--vis_freq', '0', '--output_dir', out, *METHODS[cell]] + (['--seed', str(a.seed)] if a.seed else [])
    cmd += device_args(a)
    wall_file = os.path.join(out, 'pretrain_wall_s.txt')
    if not os.path.exists(wall_file):  # a cell interrupted later on keeps its pretraining
        wall = run(cmd, log)
        with open(wall_file, 'w') as f:
            f.write(str(wall))
    return float(open(wall_file).read()), cmd


def run_cell(cell, a, out, with_finetune=True):
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, 'study.log')
    summary = {'cell': cell, 'commands': []}
    ckpt = ''
    if cell in METHODS:
        summary['pretrain_wall_s'], cmd = pretrain(cell, a, out, log)
        summary['commands'].append(cmd)
        summary['log'] = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
        ckpts = sorted(glob.glob(os.path.join(out, 'checkpoint-*.pth')), key=lambda p: int(p.split('-')[-1][:-4]))
        results, kcmd = knn(a, ckpts, os.path.join(out, 'knn.md'), log)
        summary['knn_curve'] = [{'epoch': int(c.split('-')[-1][:-4]) + 1, **r} for c, r in zip(ckpts, results)]
        summary['commands'].append(kcmd)
        summary.update(summary['knn_curve'][-1])
        ckpt = ckpts[-1]
    elif cell in FLOORS:
        res, kcmd = knn(a, [], os.path.join(out, 'knn.md'), log, FLOORS[cell])
        summary.update(res[0])
        summary['commands'].append(kcmd)
    if cell not in FLOORS and with_finetune:
        acc, wall, fcmd = finetune(a, ckpt, os.path.join(out, 'finetune'), log)
        summary.update(finetune_acc1=acc, finetune_wall_s=wall)
        summary['commands'].append(fcmd)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def segment(cell, seed, a):
    """UperNet on CamVid from `cell`'s final checkpoint ('random': no pretraining); the same budget for all.
    -> summary dict (test mIoU, aAcc, per-class IoU, wall-clock, command)"""
    out = os.path.join(a.out_dir, 'seg', f'{cell}-seed{seed}')
    done = os.path.join(out, 'summary.json')
    if os.path.exists(done) and not a.force:
        return json.load(open(done))
    cmd = ['main_segmentation.py', '--model', f'vit_{a.model}', '--data_path', a.seg_data, '--input_size',
           str(a.seg_size), '--batch_size', '8', '--epochs', str(a.seg_epochs), '--warmup_iters', '40', '--lr', a.seg_lr,
           '--layer_decay', '0.65', '--weight_decay', '0.05', '--drop_path', '0.1', '--head_channels', '64',
           '--aux_channels', '32', '--num_workers', str(a.num_workers), '--eval_batch_size', '8', '--seed', str(seed),
           '--save_freq', '1000', '--output_dir', out, *device_args(a)]
    if cell != 'random':
        cell_dir = os.path.join(a.out_dir, cell)
        pretrain(cell, a, cell_dir, os.path.join(cell_dir, 'study.log'))
        cmd += ['--finetune', os.path.join(cell_dir, f'checkpoint-{a.epochs - 1}.pth')]
    shutil.rmtree(out, ignore_errors=True)  # a fresh fine-tune, never a resume
    os.makedirs(out)
    wall = run(cmd, os.path.join(out, 'study.log'))
    last = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))][-1]
    summary = {'cell': cell, 'seed': seed, 'miou': last['test_miou'], 'aacc': last['test_aacc'],
               'macc': last['test_macc'], 'iou': last['test_iou'], 'wall_s': wall, 'command': cmd}
    with open(done, 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def mean_std(values):
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float('nan')


def segmentation_section(a):
    """The RESULTS.md section of the segmentation column, from every finished run in <out_dir>/seg."""
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.out_dir, 'seg', '*', 'summary.json')))]
    if not runs:
        return ''
    classes = [c.strip() for c in open(os.path.join(a.seg_data, 'classes.txt')) if c.strip()]
    cells = [c for c in [*METHODS, 'random'] if any(r['cell'] == c for r in runs)]
    by = {c: sorted((r for r in runs if r['cell'] == c), key=lambda r: r['seed']) for c in cells}
    rows, class_rows = [], []
    for c in cells:
        m, sd = mean_std([r['miou'] for r in by[c]])
        per_seed = ' / '.join(f"{r['miou']:.2f}" for r in by[c])
        rows.append(f"| {c} | {len(by[c])} | {m:.2f} ± {sd:.2f} | {per_seed} | "
                    f"{mean_std([r['aacc'] for r in by[c]])[0]:.2f} | {sum(r['wall_s'] for r in by[c]) / len(by[c]):.0f} |")
        for r in by[c]:
            class_rows.append(f"| {c} | {r['seed']} | " + ' | '.join(f'{v:.1f}' for v in r['iou']) + ' |')
    reading = []
    if 'mae' in by and 'random' in by:
        (m1, s1), (m0, s0) = mean_std([r['miou'] for r in by['mae']]), mean_std([r['miou'] for r in by['random']])
        pooled = ((s1 ** 2 + s0 ** 2) / 2) ** 0.5
        worst_mae, best_random = min(r['miou'] for r in by['mae']), max(r['miou'] for r in by['random'])
        per_class = [(name, sum(r['iou'][i] for r in by['mae']) / len(by['mae'])
                      - sum(r['iou'][i] for r in by['random']) / len(by['random'])) for i, name in enumerate(classes)]
        per_class = sorted((d for d in per_class if abs(d[1]) >= 1), key=lambda d: -abs(d[1]))
        reading.append(f"- UperNet from the MAE checkpoint: {m1:.2f} mIoU vs {m0:.2f} from random init "
                       f"({m1 - m0:+.2f} = {(m1 - m0) / pooled:+.1f} pooled seed std of {pooled:.2f}); the lowest MAE "
                       f"seed {'is above' if worst_mae > best_random else 'is NOT above'} the highest random-init seed "
                       f"({worst_mae:.2f} vs {best_random:.2f}). "
                       + ('A difference under 2 pooled std is inside the fine-tuning noise at this budget. '
                          if abs(m1 - m0) < 2 * pooled else '')
                       + 'Per class (mean IoU, MAE − random): '
                       + ', '.join(f'{n} {d:+.1f}' for n, d in per_class) + '.')
        learned = [n for i, n in enumerate(classes) if all(r['iou'][i] >= 1 for c in ('mae', 'random') for r in by[c])]
        reading.append(f"- Classes above 1 IoU in every run: {', '.join(learned)} ({len(learned)} of {len(classes)}); "
                       f"the thin and rare ones stay near 0 at {a.seg_size} px and {a.seg_epochs} epochs.")
    for c in cells:
        if c not in ('mae', 'random') and 'mae' in by:
            d = mean_std([r['miou'] for r in by[c]])[0] - mean_std([r['miou'] for r in by['mae']])[0]
            reading.append(f"- {c} vs MAE: {d:+.2f} mIoU.")
    commands = '\n'.join(' '.join(['python', *r['command']]) for c in cells for r in by[c]).replace(ROOT + '/', '')
    fig = os.path.join(a.out_dir, 'seg', 'mae-seed0', 'predictions.png')
    if os.path.exists(fig):
        shutil.copy(fig, os.path.join(ROOT, 'docs', 'seg_predictions.png'))
    return f"""{SEG_HEADING}

UperNet (`main_segmentation.py`) on `vit_{a.model}`, fine-tuned on the 367 CamVid training frames and scored on
all 233 test frames (11 classes, void ignored), from a study cell's final pretraining checkpoint or from random
init, with the same budget for every cell: frames rescaled to a {a.seg_size} px short side (ratio 0.5–2.0),
{a.seg_size} px crops, batch 8, {a.seg_epochs} epochs, AdamW lr {a.seg_lr} (40 warmup iterations, poly decay), layer
decay 0.65, weight decay 0.05, UperNet 64 channels, auxiliary FCN head (weight 0.4); whole-image evaluation at
the {a.seg_size} px short side, predictions resized to the 360×480 labels. The last epoch is reported (no
checkpoint is chosen on test). Fine-tuning seeds: {a.seg_seeds}.

| cell | seeds | test mIoU (mean ± std) | per seed | aAcc | wall-clock per run (s) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(reading)}

Per-class test IoU:

| cell | seed | {' | '.join(classes)} |
|---|---:|{'---:|' * len(classes)}
{chr(10).join(class_rows)}

![CamVid test: image | ground truth | prediction](docs/seg_predictions.png)

```
{commands}
```
"""


SEG_HEADING = '## Segmentation transfer: UperNet on CamVid'


def write_segmentation(a):
    """Replaces (or appends) the segmentation section of RESULTS.md; the rest of the file is left as it is."""
    text = open(a.results).read() if os.path.exists(a.results) else ''
    head = text.split(SEG_HEADING)[0].rstrip() + '\n\n' if text else ''
    with open(a.results, 'w') as f:
        f.write(head + segmentation_section(a))
    print(f'wrote the segmentation section of {a.results}')


def rerun(a):
    """Pretraining and k-NN of a finished method cell again, in a fresh folder; the k-NN difference is recorded."""
    study = os.path.join(a.out_dir, a.rerun, 'summary.json')
    if a.rerun not in METHODS or not os.path.exists(study):
        sys.exit(f'error: --rerun needs a finished method cell ({sorted(METHODS)}), no {study}')
    study = json.load(open(study))
    out = os.path.join(a.out_dir, f'rerun-{a.rerun}-seed{a.seed}')
    shutil.rmtree(out, ignore_errors=True)
    s = run_cell(a.rerun, a, out, with_finetune=False)
    r = {'cell': a.rerun, 'seed': a.seed, 'knn20': s['knn20'], 'knn200': s['knn200'], 'knn20_study': study['knn20'],
         'knn200_study': study['knn200'], 'pretrain_wall_s': s['pretrain_wall_s'], 'commands': s['commands']}
    with open(os.path.join(out, 'rerun.json'), 'w') as f:
        json.dump(r, f, indent=1)
    print(f"{a.rerun} seed {a.seed}: k-NN k=20 {r['knn20']:.2f} (study {r['knn20_study']:.2f}, "
          f"{r['knn20'] - r['knn20_study']:+.2f})")


def reading_of(summaries, reruns):
    """What the table says, computed from it (so it stays true when cells are re-run)."""
    by = {s['cell']: s for s in summaries}
    lines = []
    if 'mae' in by and FLOORS.keys() <= by.keys():
        floor = max(FLOORS, key=lambda c: by[c]['knn20'])
        lines.append(f"- MAE k-NN (k=20) {by['mae']['knn20']:.2f} vs the best floor, {floor}, "
                     f"{by[floor]['knn20']:.2f}: "
                     f"{'above' if by['mae']['knn20'] > by[floor]['knn20'] else 'NOT above'}.")
    if 'scratch' in by:
        ft = [c for c in METHODS if c in by]
        worse = [c for c in ft if by[c]['finetune_acc1'] <= by['scratch']['finetune_acc1']]
        lines.append(f"- Fine-tune top-1 from scratch {by['scratch']['finetune_acc1']:.2f}; from pretraining "
                     f"{min(by[c]['finetune_acc1'] for c in ft):.2f}–{max(by[c]['finetune_acc1'] for c in ft):.2f}"
                     + (f"; not above scratch: {', '.join(worse)}." if worse else ': every method above scratch.'))
    if 'mae' in by:
        for word, pick in (('above', lambda d: d > 0), ('not above', lambda d: d <= 0)):
            cells = [f"{c} ({by[c]['knn20'] - by['mae']['knn20']:+.2f})" for c in METHODS
                     if c in by and c != 'mae' and pick(by[c]['knn20'] - by['mae']['knn20'])]
            lines.append(f"- k-NN (k=20) {word} MAE-random: {', '.join(cells) or 'none'}.")
    seeds = [abs(r['knn20'] - r['knn20_study']) for r in reruns if r['seed'] != 0]
    if seeds:
        lines.append(f"- Another pretraining seed moved MAE's k-NN (k=20) by {max(seeds):.2f} points ({len(seeds)} "
                     f"rerun{'s' * (len(seeds) > 1)}): single runs do not resolve differences of that size.")
    return 'Reading the table (computed from it):\n\n' + '\n'.join(lines) if lines else ''


def write_results(a, summaries):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    docs = os.path.join(ROOT, 'docs')
    os.makedirs(docs, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in summaries:
        if 'log' in s:
            key = 'train_loss_pixel' if 'train_loss_pixel' in s['log'][0] else 'train_loss'
            c = COLORS.get(s['cell'])
            ax1.plot([r['epoch'] + 1 for r in s['log']], [r[key] for r in s['log']], color=c, label=s['cell'])
            ax2.plot([r['epoch'] for r in s['knn_curve']], [r['knn20'] for r in s['knn_curve']], 'o-', color=c,
                     label=s['cell'])
    for s in summaries:
        if s['cell'] in FLOORS:
            ax2.axhline(s['knn20'], color='gray', ls=FLOORS_STYLE[s['cell']], label=s['cell'])
    ax1.set(xlabel='epoch', ylabel='pixel loss (norm_pix)', title='pretraining loss')
    ax2.set(xlabel='pretraining epoch', ylabel='k-NN top-1 (k=20), %', title='k-NN on Imagenette val')
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, 'study_curves.png'), dpi=80)
    rows = []
    for s in summaries:
        f = lambda k, fmt='{:.2f}': fmt.format(s[k]) if k in s else '–'  # noqa: E731
        rows.append(f"| {s['cell']} | {f('pretrain_wall_s', '{:.0f}')} | {f('knn20')} | {f('knn200')} | {f('probe')} | "
                    f"{f('finetune_acc1')} | {f('finetune_wall_s', '{:.0f}')} |")
    commands = '\n'.join(' '.join(['python', *c]) for s in summaries for c in s['commands']).replace(ROOT + '/', '')
    notes = [f"- {s['cell']}: {open(os.path.join(a.out_dir, s['cell'], 'note.txt')).read().strip()}" for s in summaries
             if os.path.exists(os.path.join(a.out_dir, s['cell'], 'note.txt'))]
    missing = [c for c in CELLS if c not in {s['cell'] for s in summaries}]
    reruns = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.out_dir, 'rerun-*', 'rerun.json')))]
    rerun_rows = '\n'.join(f"| {r['cell']} | {r['seed']} | {r['knn20_study']:.2f} | {r['knn20']:.2f} | "
                           f"{r['knn20'] - r['knn20_study']:+.2f} | {r['knn200_study']:.2f} | {r['knn200']:.2f} | "
                           f"{r['knn200'] - r['knn200_study']:+.2f} |" for r in reruns)
    rerun_commands = '\n'.join(' '.join(['python', *c]) for r in reruns for c in r['commands']).replace(ROOT + '/', '')
    reading = reading_of(summaries, reruns)
    text = f"""# Results: a small-scale study on Imagenette at {a.input_size} px

Every number here was measured by `python benchmarks/study.py` (the commands each cell ran are listed below) on
2 CPU cores, fp32, with `mae_vit_{a.model}` / `vit_{a.model}` ({a.input_size} px, patch 8). Pretraining: the
same budget for every method, {a.epochs} epochs over the 9,469 training images, batch 128, blr 1.5e-3,
norm_pix_loss. Evaluation on the 3,925 validation images: weighted k-NN (cosine, T = 0.07, mean-pooled patch
tokens + fc_norm), a quick linear probe (BatchNorm + Linear on frozen, non-augmented features, SGD,
{a.probe_epochs} epochs), and a {a.ft_epochs}-epoch fine-tune (layer decay 0.75, mixup/cutmix, RandAugment)
compared with training the same ViT from scratch for the same epochs. Floors from the dataset README: raw
pixels 36–38% k-NN, a random ViT-Tiny/8 about 32%; measured here as the cells `untrained` (the same ViT, randomly
initialised) and `pixels16` / `pixels32` (the {a.input_size} px evaluation images average-pooled to 16 or 32 px,
flattened, mean-centred).

| cell | pretrain wall-clock (s) | k-NN k=20 | k-NN k=200 | linear probe | fine-tune top-1 | fine-tune wall-clock (s) |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{'Cells not run yet: ' + ', '.join(missing) + '.' if missing else 'All cells were run.'} Wall-clock times are single runs on a
shared 2-core machine (other work sometimes ran beside them): compare them loosely.{''.join(chr(10) + n for n in notes)}

{reading}

![curves](docs/study_curves.png)

Reproducibility: `python benchmarks/study.py --rerun CELL [--seed N]` runs a cell's pretraining and k-NN again,
with the study's command (and seed 0) or with another pretraining seed, in a separate folder.

| cell | pretraining seed | k-NN k=20 (study) | k-NN k=20 (rerun) | Δ | k-NN k=200 (study) | k-NN k=200 (rerun) | Δ |
|---|---:|---:|---:|---:|---:|---:|---:|
{rerun_rows if reruns else '| (none run yet) | | | | | | | |'}

Commands:

```
{commands}
```

Reruns:

```
{rerun_commands}
```
"""
    with open(a.results, 'w') as fh:
        fh.write(text.rstrip() + '\n\n' + segmentation_section(a))
    print(f'wrote {a.results}')


def main():
    a = get_args()
    unknown = [c for c in a.cells.split(',') if c not in CELLS]
    if unknown:
        sys.exit(f'error: unknown cells {unknown}; choose from {CELLS}')
    os.makedirs(a.out_dir, exist_ok=True)
    if a.seg:
        for cell in a.seg_cells.split(','):
            if cell not in METHODS and cell != 'random':
                sys.exit(f'error: unknown segmentation cell {cell!r}; choose from {[*METHODS, "random"]}')
            for seed in map(int, a.seg_seeds.split(',')):
                segment(cell, seed, a)
        write_segmentation(a)
        return
    if a.rerun:
        rerun(a)
    else:
        for cell in a.cells.split(','):
            done = os.path.join(a.out_dir, cell, 'summary.json')
            if a.force:
                shutil.rmtree(os.path.join(a.out_dir, cell), ignore_errors=True)
            if not os.path.exists(done):
                run_cell(cell, a, os.path.join(a.out_dir, cell))
    summaries = [json.load(open(os.path.join(a.out_dir, c, 'summary.json'))) for c in CELLS
                 if os.path.exists(os.path.join(a.out_dir, c, 'summary.json'))]
    write_results(a, summaries)


if __name__ == '__main__':
    main()
