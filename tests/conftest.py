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
