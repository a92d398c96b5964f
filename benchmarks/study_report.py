"""RESULTS.md from the study's finished units (benchmarks/study.py): tables, a reading computed from them, plots
and the commands. Every number is read from the units' summary.json files; nothing is typed in by hand.

Noise: a metric's pooled standard deviation over seeds is sqrt(mean of the per-method sample variances) of the
methods with several seeds (pretraining seeds for k-NN and the probe, fine-tuning seeds for segmentation). A
difference of at least 2 pooled std is called outside the noise, anything smaller inside it.
"""
import glob
import json
import os
import statistics

import study_plan  # the units and the methods (benchmarks/ is on sys.path: study.py and the tests put it there)
import study_transfer
from study_transfer import NOISE, in_noise, mean_std  # one noise rule for every section

CLAIMS = {  # method: what its paper claims, in the terms this study can check
    'colormae_green': 'green-noise masks give better representations than random masking (ColorMAE: +2.72 mIoU '
                      'on ADE20K, better linear probe and fine-tuning)',
    'crossmae_kept025': 'reconstructing only 25% of the patches with cross-attention keeps the quality of MAE for '
                        'less compute (CrossMAE)',
    'cmae': 'the contrastive branch improves the representation over MAE (CMAE: linear probe, fine-tuning, '
            'segmentation)',
}
COLORS = {'mae': 'black', 'colormae_green': 'tab:green', 'colormae_red': 'tab:red', 'colormae_blue': 'tab:blue',
          'colormae_purple': 'tab:purple', 'crossmae_kept075': 'tab:orange', 'crossmae_kept025': 'tab:brown',
          'cmae': 'tab:cyan'}
FLOOR_STYLE = {'untrained': '--', 'pixels16': ':', 'pixels32': '-.'}


def per(values):
    return ' / '.join(f'{v:.2f}' for v in values)


def pooled_std(groups):
    """groups: lists of repeated measurements -> sqrt(mean sample variance) over the groups with >= 2 values."""
    var = [statistics.variance(g) for g in groups if len(g) > 1]
    return (sum(var) / len(var)) ** 0.5 if var else float('nan')


def verdict(d, sd):
    """A claimed improvement d (method - MAE) -> agrees / not resolved / contradicts."""
    if sd != sd or abs(d) < NOISE * sd:
        return 'not resolved (inside the noise)'
    return 'agrees' if d > 0 else 'contradicts it'


def load(out_dir):
    """-> {unit: summary} of the pretraining units and floors (the transfer runs: study_transfer.load)"""
    units = {}
    for p in glob.glob(os.path.join(out_dir, '*', 'summary.json')):
        s = json.load(open(p))
        units[s['unit']] = s
    return units


def seed_groups(units, methods):
    """method -> its pretraining-seed units (seed 0 = the method cell), sorted by seed."""
    return {m: sorted((s for s in units.values() if s['kind'] == 'method' and s['method'] == m),
                      key=lambda s: s['seed']) for m in methods}


def shown(cmd, summary):
    """A command as RESULTS.md prints it: paths relative to the checkout the study ran in."""
    line = ' '.join(['python', *cmd])
    return line.replace(summary['root'] + '/', '') if summary.get('root') else line


def epoch_s(s):
    """Seconds per pretraining epoch of a unit: its fastest epoch (other work on the machine only adds time)."""
    return min(r['epoch_time_s'] for r in s['log'])


def rate_time(s):
    """A unit's pretraining time at its fastest epoch's rate (s)."""
    return s['epochs'] * epoch_s(s)


def long_point(a, long):
    """mae-long's last k-NN point within --long_minutes of measured pretraining time (else its first point)."""
    within = [r for r in long['knn_curve'] if r['time_s'] <= a.long_minutes * 60]
    return within[-1] if within else long['knn_curve'][0]


def fmt(s, k, f='{:.2f}'):
    return f.format(s[k]) if s is not None and k in s else '–'


def plot(units, seeds, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in sorted(units.values(), key=lambda s: s['unit']):
        if s['kind'] not in ('method', 'long', 'eqtime') or (s['kind'] == 'method' and s['seed']):
            continue
        c = COLORS.get(s['method'])
        style = {'method': '-', 'long': '--', 'eqtime': ':'}[s['kind']]
        key = 'train_loss_pixel' if 'train_loss_pixel' in s['log'][0] else 'train_loss'
        ax1.plot([r['epoch'] + 1 for r in s['log']], [r[key] for r in s['log']], style, color=c, label=s['unit'])
        kc = s['knn_curve']
        ax2.plot([r['epoch'] for r in kc], [r['knn20'] for r in kc], 'o' + style, color=c, ms=3, label=s['unit'])
        ax3.plot([r['time_s'] / 60 for r in kc], [r['knn20'] for r in kc], 'o' + style, color=c, ms=3,
                 label=s['unit'])
    for m, group in seeds.items():
        if len(group) > 1:
            mu, sd = mean_std([g['knn20'] for g in group])
            ax2.errorbar([group[0]['epoch'] if 'epoch' in group[0] else group[0]['epochs']], [mu], [sd],
                         color=COLORS.get(m), capsize=4, fmt='s', ms=4)
    for s in units.values():
        if s['kind'] == 'floor':
            for ax in (ax2, ax3):
                ax.axhline(s['knn20'], color='gray', ls=FLOOR_STYLE.get(s['unit'], '--'), lw=1, label=s['unit'])
    ax3.axhline(45, color='red', lw=0.8, alpha=0.5, label='45% target')
    ax1.set(xlabel='epoch', ylabel='pixel loss (norm_pix)', title='pretraining loss')
    ax2.set(xlabel='pretraining epoch', ylabel='k-NN top-1 (k=20), %',
            title='k-NN vs epoch (squares: seed mean ± std)')
    ax3.set(xlabel='pretraining wall-clock (min)', ylabel='k-NN top-1 (k=20), %', title='k-NN vs wall-clock')
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def time_ratio(group, mae_runs):
    """A method's pretraining time per epoch / MAE-random's, both at their fastest epochs on one machine (its
    runs and MAE's, the re-made one included, paired by machine); None when MAE was never timed where it ran."""
    ratios = [epoch_s(g) / min(epoch_s(m) for m in same) for g in group
              if (same := [m for m in mae_runs if study_plan.same_machine(g, m)])]
    return min(ratios) if ratios else None


def claims_reading(units, seeds, sd_knn, sd_probe, seg_by, sd_seg, seg_label='', mae_remade=None):
    mae = seeds.get('mae', [])
    if len(mae) < 1:
        return []
    mae_knn, mae_probe = mean_std([g['knn20'] for g in mae])[0], mean_std([g['probe'] for g in mae])[0]
    mae_epoch = min(epoch_s(g) for g in mae)  # the fastest epoch of any seed: the method's own rate
    mae_time = len(mae[0]['log']) * mae_epoch
    lines = []
    for m, claim in CLAIMS.items():
        group = seeds.get(m, [])
        if not group:
            continue
        dk = mean_std([g['knn20'] for g in group])[0] - mae_knn
        dp = mean_std([g['probe'] for g in group])[0] - mae_probe
        parts = [f'k-NN {dk:+.2f} ({in_noise(dk, sd_knn)})', f'probe {dp:+.2f} ({in_noise(dp, sd_probe)})']
        checks = {'k-NN': verdict(dk, sd_knn), 'probe': verdict(dp, sd_probe)}
        if m in seg_by and 'mae' in seg_by:
            ds = mean_std([r['miou'] for r in seg_by[m]])[0] - mean_std([r['miou'] for r in seg_by['mae']])[0]
            parts.append(f'CamVid mIoU at {seg_label} {ds:+.2f} ({in_noise(ds, sd_seg)}; std of fine-tuning seeds)')
            checks['mIoU'] = verdict(ds, sd_seg)
        eq = units.get(f'{m}-eqtime')
        ratio = time_ratio(group, mae + ([mae_remade] if mae_remade else []))
        text = (f'- **{m}** vs MAE-random, {len(group)} vs {len(mae)} pretraining seeds: ' + '; '.join(parts)
                + (f'. Pretraining time {ratio:.2f}× MAE\'s at equal epochs (fastest epochs, one machine).'
                   if ratio else '. Pretraining time not compared: MAE-random was not timed on its machine.'))
        if eq:
            de = eq['knn20'] - mae_knn
            text += (f' At MAE\'s wall-clock ({eq["epochs"]} epochs, {rate_time(eq):.0f} s vs '
                     f'{mae_time:.0f} s): k-NN {eq["knn20"]:.2f}, {de:+.2f} ({in_noise(de, sd_knn)}).')
            checks['k-NN at equal time'] = verdict(de, sd_knn)
        if m == 'crossmae_kept025':  # the claim is "no worse for less": worse beyond the noise contradicts it
            diffs = {'k-NN': (dk, sd_knn), 'probe': (dp, sd_probe)}
            if 'mIoU' in checks:
                diffs['CamVid mIoU'] = (ds, sd_seg)
            worse = [k for k, (d, sd) in diffs.items() if d <= -NOISE * sd]
            fine = [k for k in diffs if k not in worse]
            said = [f'{", ".join(fine)}: no worse than MAE beyond the noise'] if fine else []
            said += [f'{", ".join(worse)}: worse than MAE beyond the noise'] if worse else []
            if ratio is None:  # "for less" is not measured
                result = 'is not resolved (no epoch time beside MAE\'s on one machine)'
            elif ratio >= 1 or not fine:
                result = 'does not agree'
            else:
                result = f'agrees on {", ".join(fine)} and does not on {", ".join(worse)}' if worse else 'agrees'
            cost = f'each costing {ratio:.2f}× MAE\'s' if ratio else 'cost not compared'
            text += (f' Claim: {claim}. At our scale, at equal epochs ({cost}): '
                     + '; '.join(said) + f', so the result {result}'
                     + (f'; at equal wall-clock, k-NN: {checks["k-NN at equal time"]}.' if eq else '.'))
        else:
            text += (f' Claim: {claim}. At our scale: '
                     + ', '.join(f'{k} {v}' for k, v in checks.items()) + '.')
        lines.append(text)
    return lines


def device_line(a):
    if a.device == 'cuda' or a.device == 'auto' and _cuda():
        return 'one CUDA GPU (bf16 autocast)'
    return '2 CPU cores, fp32'


def _cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def write(a, root):
    """Writes a.results (and docs/study_curves.png, docs/seg_predictions.png) from a.out_dir."""
    units = load(a.out_dir)
    seeds = seed_groups(units, study_plan.SEEDED)
    multi = {m: g for m, g in seeds.items() if len(g) > 1}
    sd_knn = pooled_std([[g['knn20'] for g in grp] for grp in multi.values()])
    sd_probe = pooled_std([[g['probe'] for g in grp] for grp in multi.values()])
    os.makedirs(os.path.join(root, 'docs'), exist_ok=True)
    classes = [c.strip() for c in open(os.path.join(a.seg_data, 'classes.txt')) if c.strip()]
    seg_text, seg_by, sd_seg, seg_label = study_transfer.section(a, 'seg', root, classes)
    det_text = study_transfer.section(a, 'det', root)[0]
    main_rows = []
    for u in [*study_plan.METHODS, *study_plan.FLOORS, 'scratch']:
        s = units.get(u)
        if s is not None:
            main_rows.append(f"| {u} | {fmt(s, 'pretrain_wall_s', '{:.0f}')} | {fmt(s, 'knn20')} | {fmt(s, 'knn200')} | "
                             f"{fmt(s, 'probe')} | {fmt(s, 'finetune_acc1')} | {fmt(s, 'finetune_wall_s', '{:.0f}')} |")
    mae = seeds.get('mae', [])
    seed_rows = []
    for m, grp in seeds.items():
        if not grp:
            continue
        (k, ks), (p, ps) = mean_std([g['knn20'] for g in grp]), mean_std([g['probe'] for g in grp])
        vs = ''
        if m != 'mae' and mae:
            dk = k - mean_std([g['knn20'] for g in mae])[0]
            dp = p - mean_std([g['probe'] for g in mae])[0]
            vs = f'{dk:+.2f} ({dk / sd_knn:+.1f}σ) | {dp:+.2f} ({dp / sd_probe:+.1f}σ)'
        else:
            vs = '– | –'
        seed_rows.append(f"| {m} | {len(grp)} | {k:.2f} ± {ks:.2f} | {per([g['knn20'] for g in grp])} | "
                         f"{p:.2f} ± {ps:.2f} | {per([g['probe'] for g in grp])} | {vs} |")
    eq_rows = []
    if mae:
        mt, ms = a.epochs * min(epoch_s(g) for g in mae), mae[0]['train_time_s']  # measured: seed 0's run
        eq_rows.append(f"| mae | {a.epochs} | {mt:.0f} | {ms:.0f} | {mean_std([g['knn20'] for g in mae])[0]:.2f} | – | "
                       f"{mean_std([g['probe'] for g in mae])[0]:.2f} | – |")
        for m in study_plan.EQTIME:
            eq, grp = units.get(f'{m}-eqtime'), seeds.get(m, [])
            if eq and grp:
                eq_rows.append(f"| {m} | {eq['epochs']} | {rate_time(eq):.0f} | {eq['train_time_s']:.0f} | "
                               f"{mean_std([g['knn20'] for g in grp])[0]:.2f} | {eq['knn20']:.2f} | "
                               f"{mean_std([g['probe'] for g in grp])[0]:.2f} | {eq['probe']:.2f} |")
    long = units.get('mae-long')
    at = long_point(a, long) if long else None
    long_text = ''
    if long:
        final = long['knn_curve'][-1]
        met = 'met' if at['knn20'] >= 45 else 'NOT met'
        over = '' if at is final else (
            f" The last epoch, at {final['time_s'] / 60:.1f} measured minutes ({long['epochs']} epochs at the fastest "
            f"epoch's rate take {rate_time(long) / 60:.1f} min; other work on this shared machine slowed some epochs), "
            f"reaches {final['knn20']:.2f}%.")
        curve = '\n'.join(f"| {r['epoch']} | {r['time_s'] / 60:.1f} | {r['knn20']:.2f} | {r['knn200']:.2f} | "
                          f"{r['probe']:.2f} |" for r in long['knn_curve'])
        long_text = f"""## A one-hour MAE

`mae-long`: MAE-random with the same model and recipe for {long['epochs']} epochs ({long['budget_note']}),
{long['train_time_s'] / 60:.1f} minutes of pretraining (epoch times summed; {long['pretrain_wall_s'] / 60:.1f} minutes
with start-up and data caching). k-NN at 60 minutes against the 45% target (lightly's MAE ViT-B/32 at 128 px
after 200 epochs), the last k-NN point within {a.long_minutes:.0f} measured minutes: **{at['knn20']:.2f}% at
{at['time_s'] / 60:.1f} min, target {met}**.{over}

| epoch | wall-clock (min) | k-NN k=20 | k-NN k=200 | linear probe |
|---|---:|---:|---:|---:|
{curve}
"""
    reading = []
    floors = {u: s for u, s in units.items() if s['kind'] == 'floor'}
    if mae and floors:
        best = max(floors, key=lambda u: floors[u]['knn20'])
        mk = mean_std([g['knn20'] for g in mae])[0]
        reading.append(f"- MAE-random k-NN (k=20) {mk:.2f} (seed mean) vs the best floor, {best}, "
                       f"{floors[best]['knn20']:.2f}: {'above' if mk > floors[best]['knn20'] else 'NOT above'}.")
    if 'scratch' in units:
        ft = [u for u in study_plan.METHODS if u in units and 'finetune_acc1' in units[u]]
        if ft:
            sc = units['scratch']['finetune_acc1']
            worse = [u for u in ft if units[u]['finetune_acc1'] <= sc]
            reading.append(f"- Fine-tune top-1 from scratch {sc:.2f}; from pretraining "
                           f"{min(units[u]['finetune_acc1'] for u in ft):.2f}–"
                           f"{max(units[u]['finetune_acc1'] for u in ft):.2f}"
                           + (f"; not above scratch: {', '.join(worse)}." if worse else ': every method above scratch.'))
    if multi:
        reading.append(f'- Seed noise (pooled over {", ".join(multi)}): k-NN std {sd_knn:.2f}, probe std '
                       f'{sd_probe:.2f} points. Differences under {NOISE:.0f} pooled std are inside the noise.')
    remade = os.path.join(a.out_dir, 'mae', 'remade', 'summary.json')
    reading += claims_reading(units, seeds, sd_knn, sd_probe, seg_by, sd_seg, seg_label,
                              json.load(open(remade)) if os.path.exists(remade) else None)
    singles = [u for u in study_plan.METHODS if u in units and u not in seeds or (u in seeds and len(seeds[u]) == 1)]
    if mae and singles and sd_knn == sd_knn:
        mk = mean_std([g['knn20'] for g in mae])[0]
        reading.append('- Single-seed cells vs MAE-random k-NN: ' + ', '.join(
            f"{u} {units[u]['knn20'] - mk:+.2f} ({(units[u]['knn20'] - mk) / sd_knn:+.1f}σ)"
            for u in singles if u != 'mae') + '.')
    reading += study_transfer.headline(a, 'seg') + study_transfer.headline(a, 'det')
    if long:
        reading.append(f"- The one-hour MAE reaches {at['knn20']:.2f}% k-NN at {at['time_s'] / 60:.1f} minutes "
                       f"({'meets' if at['knn20'] >= 45 else 'does not meet'} the 45% target).")
    plot(units, seeds, os.path.join(root, 'docs', 'study_curves.png'))
    order = [u for u in study_plan.plan(a) if u in units]
    commands = '\n'.join(shown(c, units[u]) for u in order for c in units[u]['commands'])
    missing = [u for u in study_plan.plan(a) if not study_plan.is_done(a, u)]
    earlier = sorted(glob.glob(os.path.join(root, 'docs', 'RESULTS_*.md')))  # runs whose summaries were not kept
    earlier = ('Earlier runs, whose unit summaries were not kept: ' + ', '.join(
        f'[{os.path.basename(p)}](docs/{os.path.basename(p)})' for p in earlier) + '.\n\n') if earlier else ''
    text = f"""# Results: a small-scale study on Imagenette at {a.input_size} px

Every number here was measured by `python benchmarks/study.py` and written by it (`benchmarks/study_report.py`)
on {device_line(a)}, with `mae_vit_{a.model}` / `vit_{a.model}` ({a.input_size} px). Pretraining: {a.epochs}
epochs over the 9,469 training images for every method (unless a section says otherwise), batch 128, blr 1.5e-3,
norm_pix_loss, 1 warmup epoch. Evaluation on the 3,925 validation images: weighted k-NN (cosine, T = 0.07,
mean-pooled patch tokens + fc_norm), a quick linear probe (BatchNorm + Linear on frozen, non-augmented features,
SGD, {a.probe_epochs} epochs), and a {a.ft_epochs}-epoch fine-tune (layer decay 0.75, mixup/cutmix, RandAugment)
compared with training the same ViT from scratch for the same epochs. Floors: `untrained` (the same ViT, randomly
initialised) and `pixels16` / `pixels32` (the evaluation images average-pooled to 16 or 32 px, flattened,
mean-centred). Wall-clock times are from a shared machine: compare them loosely.

{earlier}{'Units not run yet: ' + ', '.join(missing) + '.' if missing else 'Every unit of the plan was run.'}

## Every method at equal epochs (pretraining seed 0)

| cell | pretrain wall-clock (s) | k-NN k=20 | k-NN k=200 | linear probe | fine-tune top-1 | fine-tune wall-clock (s) |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(main_rows)}

## Pretraining seeds

Seeds {a.seeds} of pretraining (the data order, augmentations, masks and initialisation all change); k-NN
(k=20) and linear probe of the final checkpoint. σ: the pooled std over seeds of the methods below.

| method | seeds | k-NN k=20 (mean ± std) | per seed | linear probe (mean ± std) | per seed | Δ k-NN vs MAE | Δ probe vs MAE |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(seed_rows)}

## Equal wall-clock

Each method of the table pretrained for the time MAE-random takes for its {a.epochs} epochs, its epochs set
from the measured epoch times (the fastest epoch of each seed-0 {a.epochs}-epoch run: other work on this shared
machine only ever adds time); the measured column sums the epoch times as they ran (MAE: its seed-0 run). k-NN /
probe at equal epochs are seed means; at equal time one run (seed 0).

| method | epochs | pretraining time at the fastest epoch's rate (s) | measured (s) | k-NN at {a.epochs} epochs | k-NN at equal time | probe at {a.epochs} epochs | probe at equal time |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(eq_rows)}

{chr(10).join(f"- {u}: {units[u]['budget_note']}." for u in units if units[u]['kind'] == 'eqtime')}

{long_text}
## Reading (computed from the tables)

{chr(10).join(reading)}

![curves](docs/study_curves.png)

{seg_text}
{det_text}
## Commands

```
{commands}
```
""".replace(root + '/', '')
    with open(a.results, 'w') as f:
        f.write(text)
    print(f'wrote {a.results}')
