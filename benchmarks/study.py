"""Small-scale study on Imagenette at 64 px with one small ViT: every method at an equal pretraining budget, then
k-NN (k = 20, 200), a quick linear probe on frozen features and a short fine-tune, against the untrained encoder,
raw pixels and training from scratch; seeds, equal wall-clock, a long MAE run, and dense transfer: UperNet on
CamVid and Mask R-CNN on Penn-Fudan at several fine-tuning budgets. Writes RESULTS.md (benchmarks/study_report.py
and study_transfer.py) with the tables, a computed reading, plots and the commands.

    python benchmarks/study.py                          # the whole plan, in order (many hours on 2 cores)
    python benchmarks/study.py --cells mae,mae-seed1    # some units; the results of the others are kept
    python benchmarks/study.py --report                 # only rewrite RESULTS.md from what has run
    python benchmarks/study.py --device cuda --epochs 50 --out_dir study_gpu --results RESULTS_gpu.md

Units (each in --out_dir/<unit>, done when its summary.json exists; --force reruns the named units):
- `<method>`: pretraining (seed 0) + k-NN/probe at 3 checkpoints + a fine-tune; `<method>-seed<k>`: another
  pretraining seed, k-NN/probe only; `<method>-eqtime`: the method pretrained for the wall-clock MAE-random took
  for its epochs, epochs set from the measured epoch times (the MAE and method cells run first);
  `mae-long`: MAE-random for at most --long_minutes of pretraining, k-NN every --long_knn_every epochs;
- the floors `untrained`, `pixels16`, `pixels32` (k-NN/probe) and `scratch` (fine-tune from random init);
- transfer from a cell's final checkpoint, a method, `mae-long` or `random` (no pretraining), in
  --out_dir/<seg|det>/<cell>-seed<k>-it<iterations>: `seg:<cell>-seed<k>` UperNet on CamVid for --seg_iters,
  `seg<N>:...` for N iterations, `segc:...` at the converged budget (study_transfer.converged: computed from random
  init's curve over --seg_curve); `det:`, `det<N>:`, `detc:` the same for Mask R-CNN on Penn-Fudan.
An interrupted unit keeps its finished pretraining (pretrain_wall_s.txt) and k-NN table; an interrupted
transfer unit resumes from its last checkpoint.pth when run again with the same command (started.json).
Only the summary.json files are tracked in git: on a new machine RESULTS.md is written from them, and a
transfer unit whose cell's checkpoint is missing pretrains that cell again first, by its command of record
(study.remake: the summary of record stays, the re-made run's k-NN goes beside it in <cell>/remade/ and
RESULTS.md names the runs made from it).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_report  # noqa: E402
import study_transfer  # noqa: E402
from study_plan import (CELLS, FLOORS, METHODS, SEEDED, is_done, machine, parse_unit, plan, same_machine,  # noqa: E402
                        unit_dir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def get_args(argv=None):
    p = argparse.ArgumentParser('Imagenette 64 px study')
    p.add_argument('--cells', default='', help='comma-separated units (default: the whole plan, in its order)')
    p.add_argument('--report', action='store_true', help='only write RESULTS.md from the finished units')
    p.add_argument('--force', action='store_true', help='run the named units again from scratch')
    p.add_argument('--data_path', default=os.path.join(ROOT, '..', 'shared', 'data', 'imagenette2-224'))
    p.add_argument('--out_dir', default=os.path.join(ROOT, 'study_runs'))
    p.add_argument('--results', default=os.path.join(ROOT, 'RESULTS.md'))
    p.add_argument('--model', default='micro_patch8')
    p.add_argument('--input_size', default=64, type=int)
    p.add_argument('--epochs', default=7, type=int, help='pretraining epochs of every method cell')
    p.add_argument('--seeds', default='0,1,2', help=f'pretraining seeds of {", ".join(SEEDED)}')
    p.add_argument('--ft_epochs', default=2, type=int)
    p.add_argument('--probe_epochs', default=30, type=int)
    p.add_argument('--long_minutes', default=60., type=float, help='pretraining budget of mae-long')
    p.add_argument('--long_knn_every', default=5, type=int, help='k-NN of mae-long every N epochs')
    p.add_argument('--num_workers', default=2, type=int)
    p.add_argument('--device', default='auto', help='auto, cuda or cpu (for every script the study runs)')
    # --- segmentation transfer: UperNet fine-tuned on CamVid from a cell's final checkpoint (or random init)
    p.add_argument('--seg_seeds', default='0,1', help=f'fine-tuning seeds of {", ".join(SEEDED)}, mae-long and '
                   'random (the other methods: the first)')
    p.add_argument('--seg_data', default=os.path.join(ROOT, '..', 'shared', 'data', 'camvid'))
    p.add_argument('--seg_size', default=96, type=int, help='crop = short side of the rescaled CamVid frames')
    p.add_argument('--seg_iters', default=360, type=int, help='the short budget (8 epochs of 45 iterations)')
    p.add_argument('--seg_curve', default='360,900,1800,3600,7200,14400,28800',
                   help='budgets (iterations) of the curve: random init, mae-long and mae at each (doubled while '
                   'random init still gains beyond the noise at the end); the claim cells run at the converged one '
                   '(study_transfer.converged)')
    p.add_argument('--seg_lr', default='1e-3', help='AdamW lr (absolute) of the segmentation fine-tunes')
    # --- detection transfer: Mask R-CNN fine-tuned on Penn-Fudan
    p.add_argument('--det_seeds', default='0,1', help='fine-tuning seeds of random init, mae-long and mae at the '
                   'converged detection budget (the first: at every budget of the curve)')
    p.add_argument('--det_data', default=os.path.join(ROOT, '..', 'shared', 'data', 'pennfudan'))
    p.add_argument('--det_size', default=128, type=int, help='longer side of training crops and evaluation')
    p.add_argument('--det_iters', default=256, type=int, help='the short budget (8 epochs of 32 iterations)')
    p.add_argument('--det_curve', default='256,640,1280,2560,5120,10240,20480,40960',
                   help='budgets (iterations) of the detection curve: random init, mae-long and mae at each (doubled '
                   'while random init still gains beyond the noise at the end)')
    p.add_argument('--det_lr', default='1e-3', help='AdamW lr (absolute) of the detection fine-tunes')
    p.add_argument('--det_fpn', default=48, type=int, help='--fpn_channels of the detector')
    p.add_argument('--det_fc', default=128, type=int, help='--fc_dim of the box head')
    return p.parse_args(argv)


def run(cmd, log):
    print('$', ' '.join(cmd), flush=True)
    t = time.time()
    with open(log, 'a') as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t


def device_args(a):
    """--device for every script the study runs (left out for auto: the commands stay as they were)"""
    return [] if a.device == 'auto' else ['--device', a.device]


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]


def summary_of(a, unit):
    path = os.path.join(a.out_dir, unit, 'summary.json')
    return json.load(open(path)) if os.path.exists(path) else None


def pretrain(a, method, out, seed=0, epochs=None, warmup=1, save_freq=None):
    """A method's pretraining (skipped when done before) -> (wall-clock seconds, command)"""
    os.makedirs(out, exist_ok=True)
    epochs = epochs or a.epochs
    cmd = ['main_pretrain.py', '--model', f'mae_vit_{a.model}', '--input_size', str(a.input_size), '--data_path',
           a.data_path, '--cache_data', '--num_workers', str(a.num_workers), '--norm_pix_loss', '--batch_size',
           '128', '--blr', '1.5e-3', '--epochs', str(epochs), '--warmup_epochs', str(warmup), '--save_freq',
           str(save_freq or max(epochs // 2, 1)), '--vis_freq', '0', '--output_dir', out, *METHODS[method]]
    cmd += (['--seed', str(seed)] if seed else []) + device_args(a)
    wall_file = os.path.join(out, 'pretrain_wall_s.txt')
    if not os.path.exists(wall_file):  # a unit interrupted later on keeps its pretraining
        wall = run(cmd, os.path.join(out, 'study.log'))
        with open(wall_file, 'w') as f:
            f.write(str(wall))
    return float(open(wall_file).read()), cmd


def knn(a, ckpts, out, log, model_args=None):
    """k-NN and quick probe of checkpoints (one decoding of the data; the table in `out` is not computed again).
    -> one result dict per checkpoint, the command"""
    cmd = ['main_knn.py', *(model_args or ['--model', f'vit_{a.model}']), '--input_size', str(a.input_size),
           '--data_path', a.data_path, '--cache_data', '--num_workers', str(a.num_workers), '--ks', '20', '200',
           '--probe_epochs', str(a.probe_epochs), '--output', out] + (['--finetune', *ckpts] if ckpts else [])
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
    return max(r['test_acc1'] for r in read_log(out)), wall, cmd


def epoch_time(a, unit):
    """Seconds per pretraining epoch of a finished unit: its fastest epoch (other work on a shared machine only
    ever adds time, so the minimum is the rate of the method itself, as timeit takes it)."""
    s = summary_of(a, unit)
    if s is None:
        raise RuntimeError(f'{unit} has to run first: its epoch time sets the budget of this unit')
    return min(r['epoch_time_s'] for r in s['log'])


def paired_epoch_times(a, method):
    """-> (MAE-random's s/epoch, method's s/epoch, CPU name) timed on one machine: every pretraining run of the two
    cells (seeds and re-made runs included) grouped by machine; this machine's pair first, else the first found
    (MAE's record before its re-made run). A ratio of times from two machines is no ratio of the methods (sessions
    get CPUs up to 1.7x apart)."""
    def runs(cell):
        units = [u for c in (cell, f'{cell}-seed1') for u in (c, os.path.join(c, 'remade'))]
        return [s for s in (summary_of(a, u) for u in units) if s and s.get('machine')]
    here, pairs = machine(), {}
    for m in runs('mae'):
        for g in runs(method):
            if same_machine(m, g):
                key = json.dumps(m['machine'], sort_keys=True)
                t_m, t_g = pairs.get(key, (float('inf'), float('inf')))
                pairs[key] = (min(t_m, *(r['epoch_time_s'] for r in m['log'])),
                              min(t_g, *(r['epoch_time_s'] for r in g['log'])))
    if not pairs:
        raise RuntimeError(f'{method}-eqtime needs MAE-random and {method} timed on one machine: run (or re-make) '
                           f'both cells on this one first (--cells mae,{method})')
    key = json.dumps(here, sort_keys=True)
    key = key if key in pairs else next(iter(pairs))
    return (*pairs[key], json.loads(key)['cpu'])


def budget(a, kind, method):
    """-> (epochs, warmup epochs, save_freq, note) of an equal-time or long unit, from measured epoch times
    (the fastest epochs: an epoch slowed by other work on a shared machine does not move the budget)."""
    if kind == 'eqtime':
        t_mae, t, cpu = paired_epoch_times(a, method)
        epochs = max(1, round(a.epochs * t_mae / t))
        note = (f'MAE-random takes {t_mae:.1f} s per epoch, {a.epochs * t_mae:.0f} s for {a.epochs} epochs; '
                f'{method} {t:.1f} s per epoch (fastest epochs of their {a.epochs}-epoch runs, both on {cpu}): '
                f'{epochs} epochs')
        return epochs, 1, max(epochs // 2, 1), note
    t_mae = epoch_time(a, 'mae')
    epochs = max(a.epochs, int(a.long_minutes * 60 / t_mae * 0.97))  # 3% margin: stay inside the budget
    warmup = max(1, round(epochs / a.epochs))  # the 7-epoch recipe's 1 warmup epoch, scaled
    note = (f'MAE-random at {t_mae:.1f} s per epoch (fastest epoch of the mae cell): {epochs} epochs in '
            f'{a.long_minutes:.0f} minutes, warmup {warmup}')
    return epochs, warmup, a.long_knn_every, note


def run_pretrain_unit(a, unit, kind, method, seed):
    out = os.path.join(a.out_dir, unit)
    os.makedirs(out, exist_ok=True)
    summary = {'unit': unit, 'kind': kind, 'method': method, 'seed': seed, 'epochs': a.epochs, 'commands': [],
               'root': ROOT, 'machine': machine()}
    epochs, warmup, save_freq, note = a.epochs, 1, None, ''
    if kind in ('eqtime', 'long'):
        epochs, warmup, save_freq, note = budget(a, kind, method)
        summary.update(epochs=epochs, budget_note=note)
    summary['pretrain_wall_s'], cmd = pretrain(a, method, out, seed, epochs, warmup, save_freq)
    summary['commands'].append(cmd)
    summary['log'] = read_log(out)
    ckpts = sorted(glob.glob(os.path.join(out, 'checkpoint-*.pth')), key=lambda p: int(p.split('-')[-1][:-4]))
    results, kcmd = knn(a, ckpts, os.path.join(out, 'knn.md'), os.path.join(out, 'study.log'))
    summary['commands'].append(kcmd)
    elapsed = [sum(r['epoch_time_s'] for r in summary['log'][:e + 1]) for e in range(len(summary['log']))]
    summary['train_time_s'] = elapsed[-1]
    summary['epoch_time_s'] = min(r['epoch_time_s'] for r in summary['log'])  # see epoch_time()
    summary['knn_curve'] = [{'epoch': int(c.split('-')[-1][:-4]) + 1, 'time_s': elapsed[int(c.split('-')[-1][:-4])],
                             **r} for c, r in zip(ckpts, results)]
    summary.update(summary['knn_curve'][-1])
    if kind == 'method' and seed == 0:
        acc, wall, fcmd = finetune(a, ckpts[-1], os.path.join(out, 'finetune'), os.path.join(out, 'study.log'))
        summary.update(finetune_acc1=acc, finetune_wall_s=wall)
        summary['commands'].append(fcmd)
    return summary


def run_unit(a, unit):
    kind, cell, seed = parse_unit(unit)
    if kind in study_transfer.TASKS:
        return transfer(a, *study_transfer.parse(unit, CELLS))
    if kind in ('method', 'eqtime', 'long'):
        summary = run_pretrain_unit(a, unit, kind, cell, seed)
    else:
        out = os.path.join(a.out_dir, unit)
        os.makedirs(out, exist_ok=True)
        summary = {'unit': unit, 'kind': kind, 'method': cell, 'seed': 0, 'commands': [], 'root': ROOT}
        if kind == 'floor':
            res, kcmd = knn(a, [], os.path.join(out, 'knn.md'), os.path.join(out, 'study.log'), FLOORS[cell])
            summary.update(res[0])
            summary['commands'].append(kcmd)
        else:  # scratch: the fine-tune from random init
            acc, wall, fcmd = finetune(a, '', os.path.join(out, 'finetune'), os.path.join(out, 'study.log'))
            summary.update(finetune_acc1=acc, finetune_wall_s=wall)
            summary['commands'].append(fcmd)
    with open(os.path.join(a.out_dir, unit, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def pretrained(a, cell):
    """The final checkpoint of a pretraining cell, run (again) when missing: the summaries travel in git, the
    checkpoints do not, so a new machine re-makes a cell's pretraining before fine-tuning from it (remake)."""
    record = summary_of(a, cell)
    ckpt = record and os.path.join(a.out_dir, cell, f'checkpoint-{record["epochs"] - 1}.pth')
    if record and os.path.exists(ckpt):
        return ckpt
    print(f'{cell}: pretraining {"again (its checkpoint is not on this machine)" if record else "first"}', flush=True)
    out = os.path.join(a.out_dir, cell)
    if record:  # the tracked summary of record stays in place: a killed re-make or a report meanwhile keeps it
        for path in glob.glob(os.path.join(out, '*')):
            if path != os.path.join(out, 'summary.json'):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        remake(a, cell, record)
    else:
        shutil.rmtree(out, ignore_errors=True)
        record = run_unit(a, cell)
    return os.path.join(a.out_dir, cell, f'checkpoint-{record["epochs"] - 1}.pth')


def remake(a, cell, record):
    """A cell's pretraining again by its command of record (same seed and budget), then k-NN and probe of the
    final checkpoint only: what a transfer needs, and what tells the re-made run from the one of record. The
    summary of record stays (the pretraining tables are read from it); the re-made run's goes to
    <cell>/remade/summary.json, and the transfer runs from its checkpoint say so (remade_from)."""
    out = os.path.join(a.out_dir, cell)
    cmd = [c.replace(record['root'] + '/', ROOT + '/') if record.get('root') else c for c in record['commands'][0]]
    cmd[cmd.index('--output_dir') + 1] = out
    cmd += device_args(a) if '--device' not in cmd else []
    os.makedirs(os.path.join(out, 'remade'))
    wall = run(cmd, os.path.join(out, 'study.log'))
    log = read_log(out)
    (res,), kcmd = knn(a, [os.path.join(out, f'checkpoint-{record["epochs"] - 1}.pth')],
                       os.path.join(out, 'knn.md'), os.path.join(out, 'study.log'))
    remade = {'unit': cell, 'epochs': record['epochs'], 'remade_at': time.strftime('%Y-%m-%d %H:%M'),
              'pretrain_wall_s': wall, 'train_time_s': sum(r['epoch_time_s'] for r in log), **res,
              'commands': [cmd, kcmd], 'root': ROOT, 'machine': machine(), 'log': log}
    for path, s in (('remade', remade), ('', record)):
        with open(os.path.join(out, path, 'summary.json'), 'w') as f:
            json.dump(s, f, indent=1)


def remade_from(a, cell):
    """The re-made pretraining run a transfer of `cell` starts from ({} for the run of record or random init)."""
    s = summary_of(a, os.path.join(cell, 'remade')) if cell != 'random' else None
    return {'remade_at': s['remade_at'], 'knn20': s['knn20'], 'epochs': s['epochs']} if s else {}


def transfer_cmd(a, task, iters, seed, out):
    common = ['--model', f'vit_{a.model}', '--max_iters', str(iters), '--weight_decay', '0.05', '--drop_path',
              '0.1', '--num_workers', str(a.num_workers), '--seed', str(seed), '--save_freq', '1000', '--output_dir',
              out, *device_args(a)]
    if task == 'seg':
        return ['main_segmentation.py', '--data_path', a.seg_data, '--input_size', str(a.seg_size), '--batch_size',
                '8', '--warmup_iters', '40', '--lr', a.seg_lr, '--layer_decay', '0.65', '--head_channels', '64',
                '--aux_channels', '32', '--eval_batch_size', '8', *common]
    return ['main_detection.py', '--data_path', a.det_data, '--input_size', str(a.det_size), '--fpn_channels',
            str(a.det_fpn), '--fc_dim', str(a.det_fc), '--anchor_sizes', '8', '16', '32', '64', '128',
            '--rpn_pre_nms', '500', '300', '--rpn_post_nms', '300', '200', '--rpn_batch_size', '128',
            '--roi_batch_size', '64', '--scale_range', '0.5', '2.0', '--batch_size', '4', '--warmup_iters', '20',
            '--lr', a.det_lr, '--layer_decay', '0.75', '--eval_batch_size', '4', *common]


def resume_parts(out, cmd):
    """The parts run so far of a transfer unit stopped part-way (a session's end), when its command is this one and
    its checkpoint.pth is there: the main_*.py script then resumes from that checkpoint (bit-exactly on the same
    machine). Each earlier part keeps the wall-clock up to its last checkpoint (kept_s); [] for a fresh run."""
    try:
        prior = json.load(open(os.path.join(out, 'started.json')))
    except (OSError, ValueError):
        return []
    ckpt = os.path.join(out, 'checkpoint.pth')
    if prior.get('command') != cmd or not os.path.exists(ckpt) or os.path.exists(os.path.join(out, 'summary.json')):
        return []
    parts = prior['parts']
    parts[-1]['kept_s'] = max(0., os.path.getmtime(ckpt) - parts[-1]['started_at'])
    return parts


def transfer(a, task, budget, cell, seed):
    """`task` ('seg': UperNet on CamVid, 'det': Mask R-CNN on Penn-Fudan) fine-tuned from `cell`'s final
    checkpoint ('random': no pretraining) for a budget (study_transfer.resolve).
    -> summary dict (the metrics of the last evaluation, wall-clock, command)"""
    iters = study_transfer.resolve(a, task, budget)
    if iters is None:
        raise RuntimeError(f'{task}c units need the converged budget: {study_transfer.converged(a, task)[1]}')
    out = study_transfer.run_dir(a, task, cell, seed, iters)
    cmd = transfer_cmd(a, task, iters, seed, out)
    if cell != 'random':
        cmd += ['--finetune', pretrained(a, cell)]
    parts = resume_parts(out, cmd)
    if not parts:  # a fresh fine-tune
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    parts.append({'machine': machine(), 'started_at': time.time(), 'from_epoch': len(parts) and len(read_log(out))})
    with open(os.path.join(out, 'started.json'), 'w') as f:
        json.dump({'command': cmd, 'parts': parts}, f, indent=1)
    wall = run(cmd, os.path.join(out, 'study.log'))
    last = read_log(out)[-1]
    summary = {'task': task, 'cell': cell, 'seed': seed, 'iters': iters,
               'wall_s': sum(p['kept_s'] for p in parts[:-1]) + wall, 'command': cmd, 'root': ROOT}
    if len(parts) > 1:
        summary['resumed'] = [{'machine': p['machine'], 'from_epoch': p['from_epoch']} for p in parts]
    remade = remade_from(a, cell)
    if remade:
        summary['remade_from'] = remade
    if task == 'seg':
        summary.update(miou=last['test_miou'], aacc=last['test_aacc'], macc=last['test_macc'], iou=last['test_iou'])
    else:
        summary.update(box_ap=last['test_bbox_AP'], box_ap50=last['test_bbox_AP50'], box_stats=last['test_bbox_stats'])
        if 'test_segm_AP' in last:
            summary.update(mask_ap=last['test_segm_AP'], mask_ap50=last['test_segm_AP50'],
                           mask_stats=last['test_segm_stats'])
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    a = get_args(argv)
    units = [u for u in a.cells.split(',') if u] or plan(a)
    try:
        [parse_unit(u) for u in units]
    except ValueError as e:
        sys.exit(f'error: {e}; units: {", ".join(plan(a))} (any <method>-seed<k>, '
                 f'<seg|det>[<iterations>|c]:<method|mae-long|random>-seed<k>)')
    os.makedirs(a.out_dir, exist_ok=True)
    if not a.report:
        for unit in units:
            if a.force and a.cells and unit_dir(a, unit):
                shutil.rmtree(unit_dir(a, unit), ignore_errors=True)
            if unit_dir(a, unit) is None:  # a converged-budget unit before its curve: said, not run
                print(f'{unit}: not run: {study_transfer.converged(a, parse_unit(unit)[0])[1]}', flush=True)
            elif not is_done(a, unit):
                t = time.time()
                run_unit(a, unit)
                print(f'{unit}: done in {time.time() - t:.0f} s', flush=True)
                try:  # RESULTS.md follows the study as it goes; a report error never stops the runs
                    study_report.write(a, ROOT)
                except Exception as e:  # noqa: BLE001
                    print(f'RESULTS.md not written: {type(e).__name__}: {e}', flush=True)
    study_report.write(a, ROOT)


if __name__ == '__main__':
    main()
