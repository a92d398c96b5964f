"""The study's dense-transfer units: UperNet on CamVid (`seg`) and Mask R-CNN on Penn-Fudan (`det`) fine-tuned
from a cell's final checkpoint, at several fine-tuning budgets; the converged budget computed from the curve;
the RESULTS.md sections. Standalone (no study import) so that study_plan, study.py and the report share it.

Units: `<task>:<cell>-seed<k>` at the task's short budget (--seg_iters, --det_iters), `<task><N>:<cell>-seed<k>` at
N iterations, `<task>c:<cell>-seed<k>` at the converged budget. Each runs in out_dir/<task>/<cell>-seed<k>-it<N>.

The converged budget of a task is the shortest budget of its curve from which random init gains less than 2
pooled std of the fine-tuning seeds (NOISE) to every longer budget of the curve: there, more fine-tuning no
longer changes the baseline beyond what a second seed would.
"""
import glob
import json
import os
import statistics

NOISE = 2.0  # |difference| / pooled std at which a difference is called outside the noise (every section)
TASKS = {  # task: the metrics of its summaries (the first is the headline, the budget's), their names
    'seg': {'metrics': ['miou', 'aacc'], 'names': {'miou': 'mIoU', 'aacc': 'aAcc'}, 'data': 'CamVid', 'read': 1},
    'det': {'metrics': ['box_ap', 'mask_ap', 'box_ap50', 'mask_ap50'],
            'names': {'box_ap': 'AP^box', 'mask_ap': 'AP^mask', 'box_ap50': 'AP50^box', 'mask_ap50': 'AP50^mask'},
            'data': 'Penn-Fudan', 'read': 2},  # read: how many metrics the reading compares
}
CURVE_CELLS = ['random', 'mae-long', 'mae']  # the cells fine-tuned at every budget of a curve (seed 0)
ORDER = ['mae', 'colormae_green', 'colormae_red', 'colormae_blue', 'colormae_purple', 'crossmae_kept075',
         'crossmae_kept025', 'cmae', 'mae-long', 'random']


def parse(unit, cells):
    """'seg900:random-seed1' -> ('seg', 900, 'random', 1); budget None = the short one, 'c' = converged;
    None if the unit is not a transfer unit of a known cell."""
    head, sep, rest = unit.partition(':')
    task = next((t for t in TASKS if head.startswith(t)), None)
    if not sep or task is None:
        return None
    budget = head[len(task):]
    cell, _, seed = rest.rpartition('-seed')
    if cell not in cells or not seed.isdigit() or not (budget in ('', 'c') or budget.isdigit()):
        return None
    return task, None if budget == '' else budget if budget == 'c' else int(budget), cell, int(seed)


def curve(a, task):
    """The task's budgets (iterations), shortest first."""
    return sorted(int(i) for i in getattr(a, f'{task}_curve').split(','))


def short(a, task):
    return getattr(a, f'{task}_iters')


def run_dir(a, task, cell, seed, iters):
    return os.path.join(a.out_dir, task, f'{cell}-seed{seed}-it{iters}')


def load(a, task):
    """Every finished run of the task: list of summaries (cell, seed, iters, the metrics, ...)."""
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.out_dir, task, '*', 'summary.json')))]


def group(runs, iters):
    """cell -> its runs at `iters`, by seed."""
    by = {}
    for r in sorted(runs, key=lambda r: r['seed']):
        if r['iters'] == iters:
            by.setdefault(r['cell'], []).append(r)
    return {c: by[c] for c in ORDER if c in by}


def mean(runs, key):
    return statistics.mean(r[key] for r in runs)


def pooled_std(runs, key):
    """sqrt(mean sample variance) over every (cell, budget) with 2 or more fine-tuning seeds; nan if none."""
    groups = {}
    for r in runs:
        groups.setdefault((r['cell'], r['iters']), []).append(r[key])
    var = [statistics.variance(g) for g in groups.values() if len(g) > 1]
    return (sum(var) / len(var)) ** 0.5 if var else float('nan')


def converged(a, task, runs=None):
    """-> (iterations or None, a sentence saying how they were chosen, whether random init converged there).
    None while random init's curve or the noise estimate is missing (the sentence then reads the budgets run so
    far); the longest budget (and False) when random init still gains beyond the noise at its end: the curve needs
    a longer budget."""
    runs = load(a, task) if runs is None else runs
    key, budgets = TASKS[task]['metrics'][0], curve(a, task)
    rand = {i: [r[key] for r in runs if r['cell'] == 'random' and r['iters'] == i] for i in budgets}
    missing = [i for i in budgets if not rand[i]]
    sd = pooled_std(runs, key)
    if sd != sd:
        wait = f'random init not yet fine-tuned at {", ".join(map(str, missing))} iterations' if missing else \
            'no budget has two fine-tuning seeds yet: no noise to compare the gains with'
        return None, wait, False
    ran = [i for i in budgets if rand[i]]
    m = {i: statistics.mean(rand[i]) for i in ran}
    name = TASKS[task]['names'][key]
    steps = f'random init {name} by iterations (' + ', '.join(f'{i}: {m[i]:.2f}' for i in ran) + ')'
    gain = {i: max(m[j] for j in ran[n + 1:]) - m[i] for n, i in enumerate(ran[:-1])}  # to any longer budget
    found = next((i for i in gain if gain[i] < NOISE * sd), None)
    if missing:  # no budget is settled before the whole curve has run: a longer one could still gain
        so_far = '' if len(ran) < 2 else (
            f'; so far, {steps}, it gains at most {gain[found]:+.2f} from {found} iterations on, under '
            f'{NOISE:.0f} pooled std ({NOISE * sd:.2f})' if found is not None else
            f'; so far, {steps}, it still gains beyond {NOISE:.0f} pooled std ({NOISE * sd:.2f}) at every step')
        return None, f'random init not yet fine-tuned at {", ".join(map(str, missing))} iterations{so_far}', False
    if found is not None:
        return found, (f'{steps}; from {found} iterations on it gains at most {gain[found]:+.2f} to a longer budget, '
                       f'under {NOISE:.0f} pooled std ({NOISE * sd:.2f}): converged at {found} iterations'), True
    return budgets[-1], (f'{steps} still gains beyond {NOISE:.0f} pooled std ({NOISE * sd:.2f}) at every step: '
                         f'the longest budget, {budgets[-1]}, is used and random init is NOT converged there'), False


def resolve(a, task, budget):
    """A unit's budget -> iterations (None: the converged budget is not known yet)."""
    if budget is None:
        return short(a, task)
    return converged(a, task)[0] if budget == 'c' else budget


def in_noise(d, sd):
    if sd != sd or sd == 0:
        return 'no seed noise measured'
    return f'{d / sd:+.1f} pooled std, ' + ('outside the noise' if abs(d) >= NOISE * sd else 'inside the noise')


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float('nan')


def table(by, metrics, names):
    head = '| cell | seeds | ' + ' | '.join(f'{names[k]} (mean ± std) | per seed' for k in metrics[:2])
    head += ''.join(f' | {names[k]}' for k in metrics[2:]) + ' | wall-clock per run (s) |'
    rows = [head, '|---|---:|' + '---:|' * (2 * len(metrics[:2]) + len(metrics[2:]) + 1)]
    for c, runs in by.items():
        cols = []
        for k in metrics[:2]:
            m, s = mean_std([r[k] for r in runs])
            cols += [f'{m:.2f} ± {s:.2f}' if len(runs) > 1 else f'{m:.2f}',  # no std from one seed
                     ' / '.join(f'{r[k]:.2f}' for r in runs)]
        cols += [f'{mean(runs, k):.2f}' for k in metrics[2:]]
        rows.append(f'| {c} | {len(runs)} | ' + ' | '.join(cols) + f" | {mean(runs, 'wall_s'):.0f} |")
    return '\n'.join(rows)


def comparisons(by, key, sd, name):
    """Reading lines: every cell vs random init and vs MAE at one budget."""
    lines = []
    base = mean(by['random'], key) if 'random' in by else None
    mae = mean(by['mae'], key) if 'mae' in by else None
    for c, runs in by.items():
        m, parts = mean(runs, key), []
        if base is not None and c != 'random':
            parts.append(f'vs random init {m - base:+.2f} ({in_noise(m - base, sd)})')
        if mae is not None and c not in ('mae', 'random'):
            parts.append(f'vs MAE {m - mae:+.2f} ({in_noise(m - mae, sd)})')
        if parts:
            lines.append(f'- {c} ({len(runs)} seed{"s" * (len(runs) > 1)}): {m:.2f} {name}, ' + '; '.join(parts) + '.')
    return lines


def curve_table(a, task, runs, key):
    budgets = curve(a, task)
    cells = [c for c in ORDER if any(r['cell'] == c and r['iters'] in budgets for r in runs)]
    rows = ['| cell | ' + ' | '.join(f'{i} it.' for i in budgets) + ' |', '|---|' + '---:|' * len(budgets)]
    for c in cells:
        vals = [[r[key] for r in runs if r['cell'] == c and r['iters'] == i] for i in budgets]
        rows.append(f'| {c} | ' + ' | '.join(f'{statistics.mean(v):.2f}' + (f' ({len(v)} seeds)' if len(v) > 1 else '')
                                             if v else '–' for v in vals) + ' |')
    return '\n'.join(rows), cells


def plot_curve(a, task, runs, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    metrics = TASKS[task]['metrics'][:2]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    budgets = curve(a, task)
    for ax, key in zip(axes[0], metrics):
        for c in ORDER:
            pts = [(i, [r[key] for r in runs if r['cell'] == c and r['iters'] == i]) for i in budgets]
            pts = [(i, v) for i, v in pts if v]
            if pts:
                ax.plot([i for i, _ in pts], [statistics.mean(v) for _, v in pts], 'o-', label=c, ms=4)
                for i, v in pts:
                    ax.plot([i] * len(v), v, '.', color=ax.lines[-1].get_color(), alpha=0.4)
        ax.set(xlabel='fine-tuning iterations', ylabel=TASKS[task]['names'][key], xscale='log',
               title=f"{TASKS[task]['data']} {TASKS[task]['names'][key]} vs fine-tuning budget")
        ax.set_xticks(budgets, [str(i) for i in budgets])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def shown(run):
    """A run's command as RESULTS.md prints it: paths relative to the checkout the study ran in."""
    line = ' '.join(['python', *run['command']])
    return line.replace(run['root'] + '/', '') if run.get('root') else line


def recipe(a, task):
    if task == 'seg':
        return (f"UperNet (`main_segmentation.py`) on `vit_{a.model}`, fine-tuned on the 367 CamVid training frames "
                f"and scored on all 233 test frames (11 classes, void ignored), from a cell's final pretraining "
                f"checkpoint (seed 0), from the one-hour MAE (`mae-long`) or from random init: frames rescaled to a "
                f"{a.seg_size} px short side (ratio 0.5–2.0), {a.seg_size} px crops, batch 8 (45 iterations per "
                f"epoch), AdamW lr {a.seg_lr} (40 warmup iterations, poly decay to the budget's end), layer decay "
                f"0.65, weight decay 0.05, UperNet 64 channels, auxiliary FCN head (weight 0.4); whole-image "
                f"evaluation at the {a.seg_size} px short side, predictions resized to the 360×480 labels. The last "
                f"iteration is scored (no checkpoint is chosen on test).")
    return (f"Mask R-CNN (`main_detection.py`: ViTDet backbone, simple feature pyramid {a.det_fpn} channels, "
            f"torchvision's RPN / RoI heads, box head fc {a.det_fc}) on `vit_{a.model}`, fine-tuned on the 130 "
            f"Penn-Fudan training photos and scored by pycocotools on all 40 val photos (box and mask AP, "
            f"in %), from a cell's final pretraining checkpoint (seed 0), from `mae-long` or from random init: "
            f"{a.det_size} px, large-scale jitter 0.5–2.0, batch 4 (32 iterations per epoch), AdamW lr "
            f"{a.det_lr} (20 warmup iterations, ×0.1 at 24/27 and 26/27 of the budget), layer decay 0.75, weight "
            f"decay 0.05, drop path 0.1. The last iteration is scored.")


def reached(a, task, runs):
    """The longest budget of the curve random init has been fine-tuned at (the short budget if none)."""
    done = [i for i in curve(a, task) if any(r['cell'] == 'random' and r['iters'] == i for r in runs)]
    return max(done, default=short(a, task))


def headline(a, task, runs=None):
    """Reading lines: the one-hour and the 7-epoch MAE vs random init at the claims' budget (the converged one, or
    the longest of the curve when random init has not converged, else the longest random init has run so far),
    on each read metric, said beyond or inside the noise; where a cell has not run there, at the longest budget
    where it and random init both have, named as such."""
    runs = load(a, task) if runs is None else runs
    spec = TASKS[task]
    conv, _, settled = converged(a, task, runs) if runs else (None, '', False)
    i = conv if conv is not None else reached(a, task, runs)
    by = group(runs, i)
    tag = ('random init converged there' if settled else 'random init NOT converged there' if conv is not None
           else 'the longest budget random init has run so far: the converged one is not known yet')
    lines = []
    for c in ('mae-long', 'mae'):
        j, where = i, tag
        if c not in by or 'random' not in by:  # else the longest budget where both have run, named as such
            both = [b for b in curve(a, task) if b < i and {c, 'random'} <= set(group(runs, b))]
            if not both:
                continue
            j, where = both[-1], f'the longest budget where both have run: `{c}` is not yet fine-tuned at {i}'
        by_j = group(runs, j)
        parts, beats, sds = [], [], []
        for k in spec['metrics'][:spec['read']]:
            d, sd = mean(by_j[c], k) - mean(by_j['random'], k), pooled_std(runs, k)
            sds.append(sd)
            parts.append(f"{spec['names'][k]} {mean(by_j[c], k):.2f} vs {mean(by_j['random'], k):.2f}, {d:+.2f} "
                         f"({in_noise(d, sd)})")
            beats.append(sd == sd and d >= NOISE * sd)
        if any(sd != sd for sd in sds):
            said = 'not called either way (no seed noise measured yet)'
        else:
            said = ('beats random init beyond the noise on ' + ' and '.join(spec['names'][k] for k in
                                                                       spec['metrics'][:spec['read']])
                    if all(beats) else 'does NOT beat random init beyond the noise on ' + ' and '.join(
                        spec['names'][k] for k, b in zip(spec['metrics'], beats) if not b))
        lines.append(f"- {spec['data']} at {j} fine-tuning iterations ({where}), `{c}` ({len(by_j[c])} seed"
                     f"{'s' * (len(by_j[c]) > 1)}) vs random init ({len(by_j['random'])}): " + '; '.join(parts)
                     + f': {said}.')
    return lines


def remade_lines(a, runs):
    """Which runs start from a pretraining checkpoint re-made on a later machine (same command and seed; CPU
    rounding differs), with its k-NN next to the run of record's; and which units ran in parts (resumed)."""
    lines = []
    for cell, when in dict.fromkeys((r['cell'], r['remade_from']['remade_at']) for r in runs if r.get('remade_from')):
        made = [r for r in runs if r['cell'] == cell and r.get('remade_from', {}).get('remade_at') == when]
        m = made[0]['remade_from']  # one line per re-make: each machine rounds in its own way
        path = os.path.join(a.out_dir, cell, 'summary.json')
        record = json.load(open(path))['knn20'] if os.path.exists(path) else float('nan')
        at = ', '.join(f"{r['iters']} it seed {r['seed']}" for r in made)
        lines.append(f"- `{cell}`: the runs at {at} fine-tune from its checkpoint re-made on {m['remade_at']} "
                     f"(same command and seed, {m['epochs']} epochs, another machine: k-NN 20 {m['knn20']:.2f}% vs "
                     f"{record:.2f}% for the run of record).")
    for r in runs:  # a unit stopped part way and resumed from its last checkpoint (bit-exact on one machine)
        parts = r.get('resumed') or []
        if len(parts) > 1:
            first = parts[0]['machine']
            where = ', '.join(f"epoch {p['from_epoch']} on " + ('the same machine' if p['machine'] == first else
                                                                f"another machine ({p['machine'].get('cpu')})")
                              for p in parts[1:])
            lines.append(f"- `{r['cell']}` at {r['iters']} it seed {r['seed']} ran in {len(parts)} parts, resumed "
                         f"from its checkpoint at {where}.")
    return lines


def section(a, task, root, classes=None):
    """-> (markdown of the task's section, the runs at the budget the claims are read at, their pooled std,
    that budget's label) or ('', {}, nan, '') when the task has no finished run."""
    runs = load(a, task)
    if not runs:
        return '', {}, float('nan'), ''
    spec, name = TASKS[task], TASKS[task]['names'][TASKS[task]['metrics'][0]]
    key, budgets = spec['metrics'][0], curve(a, task)
    sd = pooled_std(runs, key)
    conv, how, settled = converged(a, task, runs)
    conv_tag = 'converged budget' if settled else "the claims' budget: random init NOT converged"
    noise = ['- Fine-tuning noise, pooled std over seeds: '
             + ', '.join(f"{spec['names'][k]} {pooled_std(runs, k):.2f}" for k in spec['metrics'])
             + ' (every cell and budget with 2 or more seeds; 2 seeds each give a rough estimate). Every cell '
             'fine-tunes from one pretraining run (seed 0), so pretraining noise is not in this std.'
             if sd == sd else '- Fine-tuning noise: not measured yet (no cell has two fine-tuning seeds at any '
             'budget), so no difference here is called inside or outside the noise.']
    title = ('Segmentation transfer: UperNet on CamVid' if task == 'seg' else
             'Detection transfer: Mask R-CNN on Penn-Fudan')
    parts = [f'## {title}', recipe(a, task)]
    path = os.path.join(root, 'docs', f'{task}_curve.png')
    plot_curve(a, task, runs, path)
    curve_md, cells = curve_table(a, task, runs, key)
    parts += [f'### {name} by fine-tuning budget (seed 0 unless noted)', curve_md,
              f'![{task} curve](docs/{task}_curve.png)', f'Budget: {how}.']
    # for each pretrained cell, the longest budget where it and random init have both run: the tables the reading
    # falls back to while the claims' budget lacks the pretrained runs (budget -> those cells)
    pairs = {}
    for c in dict.fromkeys(c for b in budgets for c in group(runs, b) if c != 'random'):
        b = max((b for b in budgets if {'random', c} <= group(runs, b).keys()), default=None)
        if b is not None:
            pairs.setdefault(b, []).append(c)
    # and the longest where both have two seeds or more: the comparison that can be read against the noise
    seeded = max((b for b in budgets if len(group(runs, b).get('random', [])) > 1
                  and any(len(rs) > 1 for c, rs in group(runs, b).items() if c != 'random')), default=None)
    shown_budgets = [short(a, task)] + sorted({b for b in (seeded, *pairs, conv, reached(a, task, runs), budgets[-1])
                                               if b is not None and b != short(a, task)})
    claims_at = conv if conv is not None else short(a, task)
    label = f'{claims_at} iterations' + (f' ({conv_tag})' if conv is not None else ' (short budget)')
    for i in shown_budgets:  # already distinct
        by = group(runs, i)
        if not by:
            continue
        tag = ', '.join(t for t, b in (('short budget', short(a, task)), (conv_tag, conv),
                                        ('longest budget where random init and '
                                         + ', '.join(f'`{c}`' for c in pairs.get(i, ())) + ' have both run',
                                         i if i in pairs and i != conv else None),
                                        ('longest budget where random init and a pretrained cell both have two '
                                         'seeds or more', seeded if seeded != conv else None),
                                        ('longest budget of the curve', budgets[-1]),
                                        ('longest budget random init has run so far', None if conv else
                                         reached(a, task, runs))) if b == i)
        parts += [f'### {i} iterations ({tag})', table(by, spec['metrics'], spec['names']),
                  '\n'.join(line for k in spec['metrics'][:spec['read']]
                            for line in comparisons(by, k, pooled_std(runs, k), spec['names'][k]))
                  or '- Nothing to compare at this budget yet: '
                  + ('only random init' if 'random' in by else 'no random init') + ' has run here.']
        if classes and 'iou' in next(iter(by.values()))[0]:
            rows = [f"| {c} | {r['seed']} | " + ' | '.join(f'{v:.1f}' for v in r['iou']) + ' |'
                    for c, rs in by.items() for r in rs]
            parts += [f'Per-class test IoU at {i} iterations:', f"| cell | seed | {' | '.join(classes)} |\n"
                      f"|---|---:|{'---:|' * len(classes)}\n" + '\n'.join(rows)]
            if 'mae' in by and 'random' in by:
                d = [(n, statistics.mean(r['iou'][j] for r in by['mae']) - statistics.mean(r['iou'][j] for r in
                                                                                           by['random']))
                     for j, n in enumerate(classes)]
                big = sorted((x for x in d if abs(x[1]) >= 1), key=lambda x: -abs(x[1]))
                parts.append('Per class, MAE − random (mean IoU): ' + (', '.join(f'{n} {v:+.1f}' for n, v in big)
                                                                       or 'no class differs by 1 IoU or more') + '.')
    parts += ['\n'.join(noise + remade_lines(a, runs))]
    figure = os.path.join(run_dir(a, task, 'mae-long', 0, claims_at), 'predictions.png')
    if os.path.exists(figure):
        import shutil
        shutil.copy(figure, os.path.join(root, 'docs', f'{task}_study_predictions.png'))
        split = 'CamVid test' if task == 'seg' else 'Penn-Fudan val'
        parts.append(f'![{split}, mae-long at {claims_at} iterations](docs/{task}_study_predictions.png)')
    ordered = sorted(runs, key=lambda r: (r['iters'], ORDER.index(r['cell']), r['seed']))
    parts.append('```\n' + '\n'.join(shown(r) for r in ordered) + '\n```')
    return '\n\n'.join(parts) + '\n', group(runs, claims_at), sd, label
