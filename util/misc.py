"""Process setup (torchrun, SLURM or one process), rank-0 printing, device and precision, error exits and small
helpers. Training metrics live in util.meters."""
import builtins
import datetime
import os
import re

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback (unless --debug)."""


class NonFiniteLoss(RuntimeError):
    """A loss that is nan or inf: the run stops with exit status 1, leaving the last checkpoint as it was."""


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


_builtin_print = builtins.print


def setup_for_distributed(is_master):
    """Silence print() on all but rank 0 (force=True prints anyway)."""
    builtin_print = _builtin_print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print(f'[{now}]', *args, **kwargs)
    builtins.print = print


def init_distributed_mode(args):
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID; falls back to one process, no group.
    Sets args.rank, args.world_size, args.gpu, args.distributed and args.device (a torch.device)."""
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but no CUDA device is available')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank, args.world_size = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        args.device = torch.device(args.device)
        setup_for_distributed(True)
        return
    args.distributed = True
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
        args.device, backend = torch.device('cuda', args.gpu), 'nccl'
    else:
        args.device, backend = torch.device('cpu'), 'gloo'
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    setup_for_distributed(args.rank == 0)
    print(f'| distributed init (rank {args.rank} of {args.world_size}, {backend})', force=True)


def autocast(args):
    """torch.autocast for --amp {none,bf16,fp16} on args.device."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    return torch.autocast(device_type=args.device.type, dtype=dtype, enabled=dtype is not None)


def resolve_amp(args):
    """--amp auto -> bf16 on CUDA, none (fp32) on CPU; on CUDA also applies the usual math settings (cuda_setup)."""
    if args.amp == 'auto':
        args.amp = 'bf16' if args.device.type == 'cuda' else 'none'
    cuda_setup(args.device)


def cuda_setup(device):
    """The field's standard CUDA settings (timm, MAE): TF32 tensor cores for fp32 matmuls (cuDNN convolutions
    already default to TF32) and cuDNN autotuning for the fixed input shapes. No-op off CUDA.
    set_float32_matmul_precision('high') is the one switch that stays valid across torch 2.x (torch >= 2.9
    refuses a mix of the legacy allow_tf32 flags and the new fp32_precision ones)."""
    if torch.device(device).type != 'cuda':
        return
    torch.set_float32_matmul_precision('high')
    torch.backends.cudnn.benchmark = True


def adamw(params, device, **kwargs):
    """torch.optim.AdamW, fused (one kernel per step for all parameters, and GradScaler steps without a host
    read of found_inf) when every parameter is a floating tensor on CUDA; the foreach default elsewhere."""
    groups = list(params)
    tensors = [p for g in groups for p in (g['params'] if isinstance(g, dict) else [g])]
    fused = torch.device(device).type == 'cuda' and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict with this run's implementation flags (fused, foreach, capturable) in place of
    the saved ones. A checkpoint from another device or a non-fused run must not switch the fused kernel off
    (GradScaler would then hand fused-only arguments to the foreach step), nor leave the step counters on the
    host: torch places each `state['step']` by the *saved* groups' flags -- on the parameter's device only for
    fused or capturable groups -- and CUDA's fused AdamW refuses CPU step tensors."""
    flags = [{k: g[k] for k in ('fused', 'foreach', 'capturable') if k in g} for g in optimizer.param_groups]
    if len(state['param_groups']) == len(flags):  # else load_state_dict says what does not match
        state = {**state, 'param_groups': [{**g, **f} for g, f in zip(state['param_groups'], flags)]}
    optimizer.load_state_dict(state)


def ddp(model, args):
    """The model in DistributedDataParallel when distributed (device_ids on CUDA), else as it is. A model whose
    later encoder blocks feed nothing (`blocks_used` < its depth: CrossMAE's --use_fm, segmentation's
    --out_indices) leaves their parameters without gradients, which DDP must be told of."""
    if not getattr(args, 'distributed', False):
        return model
    unused = getattr(model, 'blocks_used', len(getattr(model, 'blocks', []))) < len(getattr(model, 'blocks', []))
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if torch.device(args.device).type == 'cuda' else None,
        find_unused_parameters=unused)


def convert_sync_batchnorm(model, args):
    """BatchNorm -> SyncBatchNorm under DDP on CUDA (statistics over the global batch, as the official CMAE /
    MoCo v3 heads and mmseg's decoders have them); unchanged otherwise (gloo has no SyncBatchNorm kernel)."""
    if getattr(args, 'distributed', False) and torch.device(args.device).type == 'cuda':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def all_reduce_mean(x):
    """Mean of a Python number over processes."""
    if get_world_size() == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / get_world_size()).item()




def add_dist_args(parser):
    """Flags every script shares: device, precision and distributed setup."""
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cuda or cpu')
    parser.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'],
                        help='autocast dtype; auto = bf16 on CUDA, none (fp32) on CPU')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--num_workers', default=4, type=int)
    parser.add_argument('--prefetch_factor', default=2, type=int,
                        help='batches each loader worker prepares ahead (with --num_workers > 0; workers persist across epochs)')
    parser.add_argument('--pin_mem', action='store_true', default=True)
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--debug', action='store_true', help='show tracebacks for input errors')
    return parser


def run_main(main, args):
    """Runs main(args). Input errors become one line on stderr and exit status 2, a non-finite loss exit
    status 1; tracebacks only with --debug."""
    try:
        main(args)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        _fail(args, e, 2)
    except NonFiniteLoss as e:
        _fail(args, e, 1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


def _fail(args, e, code):
    import sys
    if getattr(args, 'debug', False):
        raise e
    msg = str(e).strip() or type(e).__name__
    if 'Original Traceback' in msg:  # raised in a DataLoader worker: its last line says what happened
        msg = re.sub(r'^[\w.]+: ', '', msg.splitlines()[-1])  # without the 'util.misc.UserError: ' of the traceback
    _builtin_print(f'error: {msg}', file=sys.stderr, flush=True)
    sys.exit(code)


class LossScaler:
    """backward + (optional fp16 loss scaling) + optional grad clipping + optimizer step."""
    state_dict_key = 'amp_scaler'

    def __init__(self, device_type='cpu', enabled=False):
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None and parameters is not None:
            self._scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if state_dict:
            self._scaler.load_state_dict(state_dict)


class StopFlag:
    """Set by SIGTERM/SIGINT handlers; `should_stop()` agrees across processes (all-reduce of the flag)."""

    def __init__(self):
        self.set = False

    def install(self):
        import signal

        def handler(signum, frame):
            print(f'received signal {signum}: finishing the current step, then saving a checkpoint', force=True)
            self.set = True
        signal.signal(signal.SIGTERM, handler)
        return self

    def should_stop(self, device):
        if get_world_size() == 1:
            return self.set
        t = torch.tensor([float(self.set)], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)
