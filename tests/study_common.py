"""What the study's test files share (tests/test_study_report.py, tests/test_study_transfer.py): the unit
summaries they write, as study.py would, and the report written from them."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import study  # noqa: E402
import study_report  # noqa: E402

CURVES = ['--seg_curve', '360,900,1800', '--det_curve', '256,640,1280']  # the tests' curves (the study's: longer)
MACHINE = {'cpu': 'a CPU', 'boot_id': 'one boot'}


def unit(out, name, kind, method, seed, knn20, epochs=7, epoch_time=10.0, **more):
    log = [{'epoch': e, 'train_loss': 1.0 - 0.05 * e, 'epoch_time_s': epoch_time} for e in range(epochs)]
    more.setdefault('machine', MACHINE)
    s = {'unit': name, 'kind': kind, 'method': method, 'seed': seed, 'epochs': epochs, 'commands': [['x.py']],
         'pretrain_wall_s': epochs * epoch_time + 5, 'log': log, 'train_time_s': epochs * epoch_time,
         'knn_curve': [{'epoch': epochs, 'time_s': epochs * epoch_time, 'knn20': knn20, 'knn200': knn20 - 2,
                        'probe': knn20 + 10}], 'knn20': knn20, 'knn200': knn20 - 2, 'probe': knn20 + 10, **more}
    os.makedirs(out / name)
    (out / name / 'summary.json').write_text(json.dumps(s))


def seg_unit(out, cell, seed, miou, iters=360):
    d = out / 'seg' / f'{cell}-seed{seed}-it{iters}'
    os.makedirs(d)
    (d / 'summary.json').write_text(json.dumps({'task': 'seg', 'cell': cell, 'seed': seed, 'iters': iters,
                                                'miou': miou, 'aacc': 70.0, 'iou': [miou * 2, miou, 0.0],
                                                'wall_s': 100.0, 'command': ['s.py']}))


def det_unit(out, cell, seed, box, iters, **extra):
    d = out / 'det' / f'{cell}-seed{seed}-it{iters}'
    os.makedirs(d)
    (d / 'summary.json').write_text(json.dumps({'task': 'det', 'cell': cell, 'seed': seed, 'iters': iters,
                                                'box_ap': box, 'box_ap50': 2 * box, 'mask_ap': box / 2,
                                                'mask_ap50': box, 'wall_s': 50.0, 'command': ['d.py'], **extra}))


def det_report(tmp_path, out):
    """RESULTS.md written from the detection units under `out` (a one-class CamVid folder for the seg section)."""
    (tmp_path / 'camvid').mkdir()
    (tmp_path / 'camvid' / 'classes.txt').write_text('Sky\n')
    a = study.get_args([*CURVES, '--out_dir', str(out), '--results', str(tmp_path / 'R.md'), '--seg_data',
                        str(tmp_path / 'camvid')])
    study_report.write(a, str(tmp_path))
    return (tmp_path / 'R.md').read_text()
