"""Process setup (torchrun, SLURM or one process), rank-0 printing, metric logging and small helpers."""
import builtins
import datetime
import os
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback (unless --debug)."""


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
    if args.amp == 'auto':
        args.amp = 'bf16' if args.device.type == 'cuda' else 'none'


def all_reduce_mean(x):
    """Mean of a Python number over processes."""
    if get_world_size() == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / get_world_size()).item()


class SmoothedValue:
    """Tracks a series of values; reports the median/average over a window and the global average."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter='  '):
        self.meters, self.delimiter = defaultdict(SmoothedValue), delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v.item() if isinstance(v, torch.Tensor) else float(v))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header='', total=None):
        """Yields from iterable, printing progress, ETA and timings every print_freq steps."""
        total = len(iterable) if total is None else total
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                print(f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {iter_time}  data: {data_time}')
            end = time.time()
        took = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(took))} ({took / max(total, 1):.4f} s / it)')


def add_dist_args(parser):
    """Flags every script shares: device, precision and distributed setup."""
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cuda or cpu')
    parser.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'],
                        help='autocast dtype; auto = bf16 on CUDA, none (fp32) on CPU')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--num_workers', default=4, type=int)
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
    except RuntimeError as e:
        if type(e).__name__ != 'NonFiniteLoss':
            raise
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
        msg = msg.splitlines()[-1]
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
