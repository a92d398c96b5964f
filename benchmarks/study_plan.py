"""The study's plan (benchmarks/study.py runs it, benchmarks/study_report.py reads it): the methods and their
pretraining flags, the floors, the units in the order they run, and where each unit's summary lies."""
import os

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
    """Every unit in the order the study runs them: the claims' cells and their seeds first."""
    seeds, seg_seeds = [int(s) for s in a.seeds.split(',')], [int(s) for s in a.seg_seeds.split(',')]
    units = SEEDED + list(FLOORS) + ['scratch']
    units += [f'{m}-seed{s}' for s in seeds if s != 0 for m in SEEDED]
    units += [f'{m}-eqtime' for m in EQTIME]
    units += [f'seg:{c}-seed{s}' for c in SEEDED + ['random'] for s in seg_seeds]
    units += ['mae-long'] + [f'seg:mae-long-seed{s}' for s in seg_seeds]
    others = [m for m in METHODS if m not in SEEDED]
    return units + [u for m in others for u in (m, f'seg:{m}-seed{seg_seeds[0]}')]  # a cut study: whole cells


def parse_unit(unit):
    """-> (kind, method or floor, seed) for a unit name."""
    if unit.startswith('seg:'):
        cell, _, seed = unit[4:].rpartition('-seed')
        if (cell in METHODS or cell in ('random', 'mae-long')) and seed.isdigit():
            return 'seg', cell, int(seed)
    elif unit in METHODS:
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


def is_done(a, unit):
    kind, cell, seed = parse_unit(unit)
    sub = os.path.join('seg', f'{cell}-seed{seed}') if kind == 'seg' else unit
    return os.path.exists(os.path.join(a.out_dir, sub, 'summary.json'))
