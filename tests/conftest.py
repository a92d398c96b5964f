import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get('MAE_TEST_DATA', ROOT.parent / 'shared' / 'data' / 'imagenette2-224'))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope='session')
def data_path():
    assert (DATA / 'train').is_dir(), f'test data not found at {DATA} (set MAE_TEST_DATA)'
    return str(DATA)


def randomize_norms(model, seed=0):
    """LayerNorms start at (1, 0): give them other values so that tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def run_script(module, argv):
    """Runs a main_*.py script in this process (faster than a subprocess) and returns its args."""
    args = module.get_args_parser().parse_args([str(a) for a in argv])
    module.main(args)
    return args


def read_log(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


def torchrun(script, argv, nproc=2, timeout=600, env=None):
    """Runs `torchrun --nproc_per_node=nproc script argv` on CPU; returns the CompletedProcess (checked)."""
    import subprocess
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--standalone',
           str(ROOT / script), *[str(a) for a in argv]]
    e = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    assert out.returncode == 0, f'{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}'
    return out


PICO = ['--model', 'mae_vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--cache_data', '--print_freq', 50]


@pytest.fixture(scope='session')
def pico_pretrained(data_path, tmp_path_factory):
    """A pico MAE pretrained for 200 steps (25 epochs x 8) on 512 Imagenette images at 32 px (about 45 s)."""
    import main_pretrain
    out = tmp_path_factory.mktemp('pico_pretrained')
    run_script(main_pretrain, [*PICO, '--data_path', data_path, '--subset', 512, '--batch_size', 64, '--epochs', 25,
                               '--warmup_epochs', 2, '--blr', 1e-2, '--output_dir', out, '--save_freq', 10,
                               '--vis_freq', 10])
    return out
