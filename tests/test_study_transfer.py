"""The study's transfer columns (benchmarks/study_transfer.py) on synthetic unit summaries: the converged budget
read from random init's curve, the per-budget tables and readings of RESULTS.md, and transfer units that re-make a
missing checkpoint or resume a stopped run."""
import json
import os
import time

import pytest

from study_common import CURVES, det_report, det_unit, seg_unit, unit  # first: it puts benchmarks/ on the path
import study  # noqa: E402
import study_plan  # noqa: E402
import study_transfer  # noqa: E402


@pytest.mark.parametrize('values, expect', [
    ({360: [20.0, 21.0], 900: [28.0], 1800: [29.0]}, 900),   # +1.0 after 900 < 2 sd (sd 0.71): converged at 900
    ({360: [20.0, 21.0], 900: [24.0], 1800: [29.0]}, 1800),  # still climbing: the longest, said NOT converged
    ({360: [20.0, 21.0], 900: [20.0], 1800: [20.5]}, 360),
    ({360: [20.0, 21.0], 900: [25.0], 1800: [20.0]}, 900),   # a later dip does not count as a gain
])
def test_converged_budget_from_the_curve(tmp_path, values, expect):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    for iters, vs in values.items():
        for seed, v in enumerate(vs):
            seg_unit(tmp_path, 'random', seed, v, iters)
    iters, how, settled = study_transfer.converged(a, 'seg')
    assert iters == expect
    still_gaining = expect == 1800 and values[1800][0] - values[900][0] >= 2 * 0.5 ** 0.5
    assert settled == ('NOT converged' not in how) == (not still_gaining)
    assert study_plan.unit_dir(a, 'segc:cmae-seed1').endswith(f'cmae-seed1-it{expect}')


def test_converged_budget_waits_for_curve_and_noise(tmp_path):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    seg_unit(tmp_path, 'random', 0, 20.0, 360)
    seg_unit(tmp_path, 'random', 0, 25.0, 900)
    assert study_transfer.converged(a, 'seg') == (None, 'random init not yet fine-tuned at 1800 iterations', False)
    seg_unit(tmp_path, 'random', 0, 26.0, 1800)
    assert study_transfer.converged(a, 'seg')[0] is None  # one seed everywhere: no noise yet
    seg_unit(tmp_path, 'mae', 1, 26.0, 1800)
    seg_unit(tmp_path, 'mae', 0, 24.0, 1800)  # sd from another cell's seeds: sqrt(2) -> 2 sd = 2.83
    assert study_transfer.converged(a, 'seg')[0] == 900


@pytest.mark.parametrize('at900, says', [
    (25.0, 'so far, random init mIoU by iterations (360: 20.50, 900: 25.00), it still gains beyond 2 pooled std (1.41) '
           'at every step'),
    (21.5, 'so far, random init mIoU by iterations (360: 20.50, 900: 21.50), it gains at most +1.00 from 360 '
           'iterations on, under 2 pooled std (1.41)'),
])
def test_converged_budget_reads_the_curve_run_so_far(tmp_path, at900, says):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    seg_unit(tmp_path, 'random', 0, 20.0, 360)
    seg_unit(tmp_path, 'random', 1, 21.0, 360)  # sd 0.71 -> 2 sd = 1.41
    seg_unit(tmp_path, 'random', 0, at900, 900)
    assert study_transfer.converged(a, 'seg') == (
        None, f'random init not yet fine-tuned at 1800 iterations; {says}', False)  # 1800 could still gain


def test_detection_section(tmp_path):
    out = tmp_path / 'runs'
    for cell, box in (('random', (2.0, 3.0)), ('mae-long', (8.0, 9.0))):
        for seed, v in enumerate(box):
            det_unit(out, cell, seed, v, 1280)
        det_unit(out, cell, 0, box[0] / 2, 256)
    det_unit(out, 'mae', 0, 2.5, 1280)  # random init's mean: inside the noise
    amd, intel = {'cpu': 'AMD EPYC', 'boot_id': 'a'}, {'cpu': 'Intel Xeon', 'boot_id': 'b'}
    det_unit(out, 'mae', 0, 1.0, 256, resumed=[{'machine': amd, 'from_epoch': 0}, {'machine': amd, 'from_epoch': 5},
                                               {'machine': intel, 'from_epoch': 7}])
    text = det_report(tmp_path, out)
    assert '## Detection transfer: Mask R-CNN on Penn-Fudan' in text
    assert '| mae-long | 2 | 8.50 ± 0.71 | 8.00 / 9.00 | 4.25 ± 0.35 | 4.00 / 4.50 |' in text
    assert ('- mae-long (2 seeds): 8.50 AP^box, vs random init +6.00 (+8.5 pooled std, outside the noise); vs MAE '
            '+6.00 (+8.5 pooled std, outside the noise).') in text
    assert 'random init not yet fine-tuned at 640 iterations' in text
    assert ('- `mae` at 256 it seed 0 ran in 3 parts, resumed from its checkpoint at epoch 5 on the same machine, '
            'epoch 7 on another machine (Intel Xeon).') in text
    assert '| mae | 1 | 2.50 | 2.50 | 1.25 | 1.25 |' in text and '± nan' not in text  # no std from one seed
    # the reading: at the longest budget random init has run (640 is missing), both AP against the pooled noise
    assert ('- Penn-Fudan at 1280 fine-tuning iterations (the longest budget random init has run so far: the '
            'converged one is not known yet), `mae-long` (2 seeds) vs random init (2): AP^box 8.50 vs 2.50, +6.00 '
            '(+8.5 pooled std, outside the noise); AP^mask 4.25 vs 1.25, +3.00 (+8.5 pooled std, outside the '
            'noise): beats random init beyond the noise on AP^box and AP^mask.') in text
    assert ('`mae` (1 seed) vs random init (2): AP^box 2.50 vs 2.50, +0.00 (+0.0 pooled std, inside the noise); '
            'AP^mask 1.25 vs 1.25, +0.00 (+0.0 pooled std, inside the noise): does NOT beat random init beyond the '
            'noise on AP^box and AP^mask.') in text
    assert (tmp_path / 'docs' / 'det_curve.png').exists()


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_transfer_unit_reads_its_run_and_remakes_a_missing_checkpoint(tmp_path, monkeypatch, task):
    """A transfer unit at the converged budget: the command gets that budget and the cell's checkpoint; a cell
    whose summary is present but whose checkpoint is not (a new machine) is pretrained again first."""
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path), '--results', str(tmp_path / 'R.md')])
    for iters, v in ((360, 20.0), (900, 25.0), (1800, 25.5)) if task == 'seg' else ((256, 2.0), (640, 5.0),
                                                                                       (1280, 5.1)):
        write_run = seg_unit if task == 'seg' else det_unit
        write_run(tmp_path, 'random', 0, v, iters)
        write_run(tmp_path, 'random', 1, v + 0.5, iters)
    unit(tmp_path / 'gone', 'mae', 'method', 'mae', 0, 40.0,  # its summary; the checkpoint-6.pth it names: absent
         root='/old', commands=[['main_pretrain.py', '--data_path', '/old/../data', '--output_dir', '/old/runs/mae']])
    os.rename(tmp_path / 'gone' / 'mae', tmp_path / 'mae')
    (tmp_path / 'mae' / 'checkpoint-3.pth').write_bytes(b'a stale checkpoint of an interrupted run')
    commands, knns = [], []

    def run(cmd, log):
        commands.append(cmd)
        out = cmd[cmd.index('--output_dir') + 1]
        last = ({'test_miou': 30.0, 'test_aacc': 80.0, 'test_macc': 40.0, 'test_iou': [1.0]} if task == 'seg' else
                {'test_bbox_AP': 7.0, 'test_bbox_AP50': 20.0, 'test_bbox_stats': [7.0] * 12, 'test_segm_AP': 6.0,
                 'test_segm_AP50': 18.0, 'test_segm_stats': [6.0] * 12})
        if cmd[0] == 'main_pretrain.py':  # the command of record, run again
            last = {'train_loss': 0.5, 'epoch_time_s': 9.0}
            # while it runs, the summary of record stays in place and the old checkpoints are gone
            assert json.load(open(tmp_path / 'mae' / 'summary.json'))['knn20'] == 40.0
            assert not (tmp_path / 'mae' / 'checkpoint-3.pth').exists()
        (tmp_path / out / 'log.txt').write_text(json.dumps({'epoch': 0, **last}) + '\n')
        return 12.0

    def knn(a, ckpts, out, log):
        knns.append(ckpts)
        return [{'knn20': 41.5, 'knn200': 39.0, 'probe': 50.0}], ['main_knn.py']
    monkeypatch.setattr(study, 'run', run)
    monkeypatch.setattr(study, 'knn', knn)
    s = study.transfer(a, task, 'c', 'mae', 1)
    conv = 900 if task == 'seg' else 640
    assert s['iters'] == conv and s['seed'] == 1
    assert commands[0] == ['main_pretrain.py', '--data_path', study.ROOT + '/../data', '--output_dir',
                           str(tmp_path / 'mae')]  # the command of record, in this checkout
    assert knns == [[str(tmp_path / 'mae' / 'checkpoint-6.pth')]]  # the final checkpoint only
    cmd = commands[1]
    assert cmd[cmd.index('--max_iters') + 1] == str(conv) and cmd[cmd.index('--seed') + 1] == '1'
    assert cmd[cmd.index('--finetune') + 1] == os.path.join(str(tmp_path), 'mae', 'checkpoint-6.pth')
    assert s == json.load(open(tmp_path / task / f'mae-seed1-it{conv}' / 'summary.json'))
    assert (s['miou'], s['iou']) == (30.0, [1.0]) if task == 'seg' else (s['box_ap'], s['mask_ap50']) == (7.0, 18.0)
    assert study_plan.is_done(a, f'{task}c:mae-seed1') and not study_plan.is_done(a, f'{task}c:mae-seed0')
    # the summary of record stays, the re-made run lies beside it, and the transfer run and the report say so
    assert json.load(open(tmp_path / 'mae' / 'summary.json'))['knn20'] == 40.0
    assert json.load(open(tmp_path / 'mae' / 'remade' / 'summary.json'))['knn20'] == 41.5
    assert s['remade_from']['knn20'] == 41.5 and s['remade_from']['epochs'] == 7
    line, = study_transfer.remade_lines(a, study_transfer.load(a, task))
    assert f'{conv} it seed 1' in line and '41.50% vs 40.00%' in line


def test_each_remake_of_a_cell_gets_its_own_line(tmp_path):
    """Two machines re-made `mae` (each rounds in its own way): the runs are named under the re-make they
    fine-tuned from, one line each; runs from the run of record are not named."""
    a = study.get_args(['--out_dir', str(tmp_path)])
    (tmp_path / 'mae').mkdir()
    (tmp_path / 'mae' / 'summary.json').write_text(json.dumps({'knn20': 40.0}))
    made = {'09:04': {'remade_at': '09:04', 'knn20': 40.0, 'epochs': 7},
            '15:02': {'remade_at': '15:02', 'knn20': 40.1, 'epochs': 7}}
    runs = [{'cell': 'mae', 'seed': 0, 'iters': 1280, 'remade_from': made['09:04']},
            {'cell': 'mae', 'seed': 0, 'iters': 640, 'remade_from': made['15:02']},
            {'cell': 'mae', 'seed': 1, 'iters': 1280, 'remade_from': made['15:02']},
            {'cell': 'mae', 'seed': 0, 'iters': 256},
            {'cell': 'random', 'seed': 0, 'iters': 1280}]
    first, second = study_transfer.remade_lines(a, runs)
    assert 'runs at 1280 it seed 0 fine-tune' in first and 're-made on 09:04' in first and '40.00% vs 40.00%' in first
    assert 'runs at 640 it seed 0, 1280 it seed 1 fine-tune' in second and '40.10% vs 40.00%' in second
    assert '256' not in first + second


def test_reading_falls_back_to_the_longest_budget_both_have_run(tmp_path):
    """mae-long is not yet fine-tuned at the claims' budget (1280): its line reads it against random init at 640,
    the longest budget where both have run, and says so; a cell with no common budget gets no line."""
    a = study.get_args(['--out_dir', str(tmp_path), '--det_curve', '640,1280'])
    runs = [{'cell': 'random', 'seed': 0, 'iters': 640, 'box_ap': 2.0, 'mask_ap': 1.0},
            {'cell': 'random', 'seed': 0, 'iters': 1280, 'box_ap': 10.0, 'mask_ap': 6.0},
            {'cell': 'random', 'seed': 1, 'iters': 1280, 'box_ap': 11.0, 'mask_ap': 7.0},
            {'cell': 'mae-long', 'seed': 0, 'iters': 640, 'box_ap': 9.0, 'mask_ap': 5.0}]
    line, = study_transfer.headline(a, 'det', runs)
    assert line.startswith('- Penn-Fudan at 640 fine-tuning iterations (the longest budget where both have run: '
                           '`mae-long` is not yet fine-tuned at 1280), `mae-long` (1 seed) vs random init (1): '
                           'AP^box 9.00 vs 2.00, +7.00 (+9.9 pooled std, outside the noise)'), line


def test_transfer_unit_stopped_part_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A det unit stopped at a session's end (started.json and checkpoint.pth there, no summary) runs its command
    again without clearing its folder, so that main_detection resumes; the summary adds up the kept wall-clock and
    names each part's machine. Another command (another budget, say) starts afresh."""
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    out = tmp_path / 'det' / 'random-seed0-it256'
    cleared = []

    def run(cmd, log, stop_after=None):
        cleared.append(not (out / 'log.txt').exists())
        with open(out / 'log.txt', 'a') as f:
            for e in range(2):
                f.write(json.dumps({'epoch': e, 'train_loss': 1.0}) + '\n')
        if stop_after:  # killed: epoch 1's checkpoint is the last one written
            (out / 'checkpoint.pth').write_bytes(b'epoch 1')
            os.utime(out / 'checkpoint.pth', (time.time() + 30, time.time() + 30))
            raise KeyboardInterrupt
        with open(out / 'log.txt', 'a') as f:
            f.write(json.dumps({'epoch': 2, 'test_bbox_AP': 7.0, 'test_bbox_AP50': 20.0,
                                'test_bbox_stats': [7.0] * 12}) + '\n')
        return 100.0
    monkeypatch.setattr(study, 'run', lambda cmd, log: run(cmd, log, stop_after=True))
    with pytest.raises(KeyboardInterrupt):
        study.transfer(a, 'det', 256, 'random', 0)
    started = json.load(open(out / 'started.json'))
    assert len(started['parts']) == 1 and not (out / 'summary.json').exists()
    monkeypatch.setattr(study, 'run', run)
    monkeypatch.setattr(study, 'machine', lambda: {'cpu': 'another CPU', 'boot_id': '2'})
    s = study.transfer(a, 'det', 256, 'random', 0)
    assert cleared == [True, False]  # the second part found the first one's files
    assert s['box_ap'] == 7.0 and 130.0 <= s['wall_s'] <= 140.0  # 30 s kept (to the checkpoint) + 100 s
    assert [p['from_epoch'] for p in s['resumed']] == [0, 2] and s['resumed'][1]['machine']['cpu'] == 'another CPU'
    s2 = study.transfer(a, 'det', 256, 'random', 0)  # a finished unit run again (--force): afresh
    assert cleared[-1] is True and 'resumed' not in s2


def test_detection_section_keeps_the_longest_budget_both_have_run(tmp_path):
    """Random init alone has run at the claims' budget (1280): the table at 640, where it and `mae-long` have both
    run, stays in the section, named as such, with its comparison."""
    out = tmp_path / 'runs'
    det_unit(out, 'random', 0, 1.0, 256)
    for seed, v in enumerate((2.0, 3.0)):
        det_unit(out, 'random', seed, v, 640)
    det_unit(out, 'mae-long', 0, 9.0, 640)
    det_unit(out, 'random', 0, 20.0, 1280)  # still gains beyond the noise: 1280 is used, not converged
    text = det_report(tmp_path, out)
    both = text.index('### 640 iterations (longest budget where random init and `mae-long` have both run)')
    claims = text.index("### 1280 iterations (the claims' budget: random init NOT converged, longest budget of "
                        "the curve)")
    assert both < text.index('- mae-long (1 seed): 9.00 AP^box, vs random init +6.50', both) < claims
    assert '- Nothing to compare at this budget yet: only random init has run here.' in text[claims:]


def test_detection_section_keeps_each_cells_longest_budget_beside_random_init(tmp_path):
    """`mae-long` has run beside random init up to 640 and `mae` up to 1280: each cell's longest budget beside random
    init keeps its own table and comparison, named after the cell, so a longer `mae` run does not hide `mae-long`."""
    out = tmp_path / 'runs'
    for i, v in ((256, 1.0), (640, 2.0), (1280, 20.0)):
        det_unit(out, 'random', 0, v, i)
    det_unit(out, 'random', 1, 3.0, 640)
    det_unit(out, 'mae-long', 0, 9.0, 640)
    det_unit(out, 'mae', 0, 18.0, 1280)
    text = det_report(tmp_path, out)
    long_ = text.index('### 640 iterations (longest budget where random init and `mae-long` have both run)')
    mae = text.index('### 1280 iterations (')
    assert long_ < text.index('- mae-long (1 seed): 9.00 AP^box, vs random init +6.50', long_) < mae
    assert '- mae (1 seed): 18.00 AP^box, vs random init -2.00' in text[mae:]


def test_detection_section_names_the_missing_random_init(tmp_path):
    """`mae-long` alone at the end of the curve: its section says random init has not run there, and no
    comparison is made up."""
    out = tmp_path / 'runs'
    det_unit(out, 'random', 0, 1.0, 256)
    for seed, v in enumerate((2.0, 3.0)):
        det_unit(out, 'random', seed, v, 640)
    det_unit(out, 'mae-long', 0, 21.0, 1280)
    text = det_report(tmp_path, out)
    end = text.index('### 1280 iterations (longest budget of the curve)')
    assert '- Nothing to compare at this budget yet: no random init has run here.' in text[end:]
    assert 'vs random init' not in text[end:text.index('Fine-tuning noise', end)]


def test_detection_section_keeps_the_longest_budget_both_have_two_seeds(tmp_path):
    """Both have two seeds at 640 but one each at 1280 (the longest budget both have run): the 640 table, whose
    comparison is read against the noise of two seeds each, keeps its own section, named as such."""
    out = tmp_path / 'runs'
    det_unit(out, 'random', 0, 1.0, 256)
    for seed, (r, m) in enumerate(((2.0, 9.0), (3.0, 10.0))):
        det_unit(out, 'random', seed, r, 640)
        det_unit(out, 'mae-long', seed, m, 640)
    det_unit(out, 'random', 0, 20.0, 1280)
    det_unit(out, 'mae-long', 0, 21.0, 1280)
    text = det_report(tmp_path, out)
    seeded = text.index('### 640 iterations (longest budget where random init and a pretrained cell both have two '
                        'seeds or more)')
    both = text.index('### 1280 iterations (')
    assert seeded < text.index('- mae-long (2 seeds): 9.50 AP^box, vs random init +7.00', seeded) < both
    assert "the claims' budget" in text[both:text.index('\n', both)]  # both have run at 1280: the claims' table
