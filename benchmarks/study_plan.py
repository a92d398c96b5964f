"""The study's plan (benchmarks/study.py runs it, benchmarks/study_report.py reads it): the methods and their
pretraining flags, the floors, the units in the order they run, and where each unit's summary lies."""
import os
import platform

import study_transfer

METHODS = {  # method: extra pretraining flags
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
SEEDED = ['mae', 'colormae_green', 'crossmae_kept025', 'cmae']  # three pretraining seeds, two segmentation seeds
EQTIME = ['crossmae_kept025', 'cmae']  # also at MAE-random's wall-clock
FLOORS = {  # unit: main_knn.py model flags (None: the study's ViT, untrained); k-NN only
    'untrained': None,
    'pixels16': ['--model', 'pixels', '--pixel_size', '16'],
    'pixels32': ['--model', 'pixels', '--pixel_size', '32'],
}


def plan(a):
    """Every unit in the order the study runs them: the claims' cells and their seeds first, then the transfer
    curves (random init, mae-long, mae at every budget), the claim cells at the converged segmentation budget and
    Mask R-CNN's curve cells at the converged detection budget with more seeds; a cut study leaves whole cells out."""
    seeds, seg_seeds = [int(s) for s in a.seeds.split(',')], [int(s) for s in a.seg_seeds.split(',')]
    det_seeds = [int(s) for s in a.det_seeds.split(',')]
    units = SEEDED + list(FLOORS) + ['scratch']
    units += [f'{m}-seed{s}' for s in seeds if s != 0 for m in SEEDED]
    units += [f'{m}-eqtime' for m in EQTIME]
    units += [f'seg:{c}-seed{s}' for c in SEEDED + ['random'] for s in seg_seeds]
    units += ['mae-long'] + [f'seg:mae-long-seed{s}' for s in seg_seeds]
    for task in study_transfer.TASKS:
        short = study_transfer.short(a, task)
        units += [f'{task}:{c}-seed0' for c in study_transfer.CURVE_CELLS if f'{task}:{c}-seed0' not in units]
        units += [f'{task}{i}:{c}-seed0' for i in study_transfer.curve(a, task) if i != short
                  for c in study_transfer.CURVE_CELLS]
    units += [f'segc:{c}-seed{s}' for s in seg_seeds for c in ('random', 'mae-long', 'mae')]
    units += [f'segc:{c}-seed{s}' for s in seg_seeds for c in SEEDED[1:]]  # one seed each first if cut
    units += [f'detc:{c}-seed{s}' for s in det_seeds[1:] for c in study_transfer.CURVE_CELLS]
    others = [m for m in METHODS if m not in SEEDED]
    return units + [u for m in others for u in (m, f'seg:{m}-seed{seg_seeds[0]}')]


CELLS = [*METHODS, 'random', 'mae-long']  # what a transfer unit fine-tunes from


def parse_unit(unit):
    """-> (kind, method or floor, seed) for a unit name ('seg' / 'det' for transfer units: see
    study_transfer.parse for their budget)."""
    transfer = study_transfer.parse(unit, CELLS)
    if transfer is not None:
        return transfer[0], transfer[2], transfer[3]
    if unit in METHODS:
        return 'method', unit, 0
    elif unit in FLOORS or unit == 'scratch':
        return unit if unit == 'scratch' else 'floor', unit, 0
    elif unit == 'mae-long':
        return 'long', 'mae', 0
    elif unit.endswith('-eqtime') and unit[:-7] in METHODS:
        return 'eqtime', unit[:-7], 0
    else:
        method, _, seed = unit.rpartition('-seed')
        if method in METHODS and seed.isdigit():
            return 'method', method, int(seed)
    raise ValueError(f'unknown unit {unit!r}')


def unit_dir(a, unit):
    """Where a unit's summary.json lies; None for a converged-budget unit whose budget is not known yet."""
    transfer = study_transfer.parse(unit, CELLS)
    if transfer is None:
        parse_unit(unit)
        return os.path.join(a.out_dir, unit)
    task, budget, cell, seed = transfer
    iters = study_transfer.resolve(a, task, budget)
    return None if iters is None else study_transfer.run_dir(a, task, cell, seed, iters)


def is_done(a, unit):
    d = unit_dir(a, unit)
    return d is not None and os.path.exists(os.path.join(d, 'summary.json'))


def machine():
    """Where a unit ran: the CPU and this boot of the machine. Epoch times compare only within one boot: sessions
    get other machines, and two CPUs of one name can differ 1.7x in speed."""
    def read(path, pick):
        try:
            return pick(open(path).read())
        except (OSError, StopIteration):
            return None
    cpu = read('/proc/cpuinfo', lambda t: next(l.split(':', 1)[1].strip() for l in t.splitlines()
                                                if l.startswith('model name')))
    return {'cpu': cpu or platform.processor(), 'boot_id': read('/proc/sys/kernel/random/boot_id', str.strip)
            or platform.node()}


def same_machine(s, t):
    """Whether two summaries were timed on one machine (a summary from before this was recorded: unknown, no)."""
    return s.get('machine') is not None and s.get('machine') == t.get('machine')
