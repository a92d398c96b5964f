"""Checkpoints: atomic writes, safe loading (weights_only=True), RNG state capture, auto-resume."""
import argparse
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from util.misc import UserError, is_main_process


def save_checkpoint(state, path):
    """Write `state` to path atomically: a temp file in the same folder, fsync, then rename over the target.
    A crash mid-write leaves the previous file intact."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """torch.load with weights_only=True; argparse.Namespace (in official MAE checkpoints) is allow-listed.
    Anything else that needs unpickling arbitrary objects is refused with a readable error."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    with open(path, 'rb') as f:
        legacy_pickle = f.read(1) == b'\x80'
    if not (legacy_pickle or zipfile.is_zipfile(path)):  # torch.save writes a zip (or, long ago, a pickle)
        raise UserError(f'cannot read checkpoint {path}: not a PyTorch checkpoint (neither torch.save\'s zip format '
                        'nor a pickle)')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise UserError(f'refusing to load {path}: it holds objects other than tensors and plain data '
                        f'(weights_only=True; nothing was executed). {first}') from e
    except Exception as e:  # noqa: BLE001 -- not a checkpoint (text, truncated, another format): one line
        raise UserError(f'cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from e


def model_state(ckpt):
    """The model state_dict inside a checkpoint file's contents ({'model': ...}, {'state_dict': ...} or bare)."""
    for key in ('model', 'state_dict'):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError('checkpoint holds no model state_dict (expected a "model" entry)')


def rng_state():
    """The RNG states of torch, CUDA, numpy and python, as plain data."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state['python']))
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def check_output_dir(output_dir):
    """Create output_dir and make sure it is writable (one clear error otherwise)."""
    if not output_dir:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f'.write_test.{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f'output_dir {output_dir} is not writable: {e.strerror or e}') from e


def resume_path(args):
    """--resume if given, else output_dir/checkpoint.pth if it exists (automatic resume), else ''."""
    if args.resume:
        return args.resume
    auto = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
    return auto if auto and os.path.isfile(auto) else ''


def save_on_master(state, path):
    if is_main_process():
        save_checkpoint(state, path)


def save_epoch(state, output_dir, save_freq, epochs):
    """DINO's layout: output_dir/checkpoint.pth with everything a resume needs, every epoch; the model alone
    (with epoch and args) in checkpoint-{epoch}.pth every save_freq epochs and at the last."""
    epoch = state['epoch']
    save_on_master(state, os.path.join(output_dir, 'checkpoint.pth'))
    if (epoch + 1) % save_freq == 0 or epoch + 1 == epochs:
        save_on_master({'model': state['model'], 'epoch': epoch, 'args': state['args']},
                       os.path.join(output_dir, f'checkpoint-{epoch}.pth'))


def checkpoint_args(args):
    """The run's flags as plain values (weights_only=True loads them): anything else becomes its str()."""
    return {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v) for k, v in vars(args).items()}
