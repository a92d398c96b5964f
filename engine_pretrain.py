"""One pretraining epoch. The model's forward returns (loss, pred, mask[, logs]); a tuple batch of views is
passed to the model as positional arguments (the contrastive model takes two views).

No step waits for the GPU: the loss and the model's logs stay on the device (detached tensors queued in a
`meters.DeviceMeters`) and are read in one device-to-host copy every --print_freq steps (the steps that
`log_every` prints) and at the end of the epoch; under DDP that read is one all-reduce, which also carries
the SIGTERM stop flag (`util.meters.StepReader`, which every training engine uses). A stop request ends the epoch
at the next optimizer step, which then reports the steps really taken (a request seen at the epoch's last step
lets the epoch finish; the caller checks the flag after it).
"""
import itertools
from contextlib import nullcontext

import util.lr_sched as lr_sched
import util.meters as meters
import util.misc as misc


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, args, mask_gen=None, log_writer=None,
                    start_step=0, stop_flag=None, after_step=None):
    """Returns (stats dict, steps completed in this epoch counting start_step, interrupted: bool)."""
    model.train(True)
    metric_logger = meters.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', meters.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    accum_iter, device = args.accum_iter, args.device
    steps_per_epoch = start_step + len(data_loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    optimizer.zero_grad()
    step, interrupted, stop_requested = start_step, False, False
    total = steps_per_epoch - start_step
    reader = meters.StepReader(args, epoch, steps_per_epoch, metric_logger, None if args.no_step_log else log_writer,
                        stop_flag)
    batches = itertools.islice(data_loader, total)
    for i, (samples, _) in enumerate(metric_logger.log_every(batches, args.print_freq, header, total)):
        step = start_step + i
        if step % accum_iter == 0:  # per-iteration schedule, set on the first micro-step of a group
            lr_sched.adjust_learning_rate(optimizer, step / steps_per_epoch + epoch, args)
        views = samples if isinstance(samples, (list, tuple)) else [samples]
        views = [v.to(device, non_blocking=True) for v in views]
        noise = mask_gen(views[0].shape[0]) if mask_gen is not None else None
        update = (step + 1) % accum_iter == 0
        sync_ctx = model.no_sync() if args.distributed and not update else nullcontext()  # no all-reduce mid-group
        with sync_ctx:
            with misc.autocast(args):
                out = model(*views, mask_ratio=args.mask_ratio, noise=noise, kept_mask_ratio=args.kept_mask_ratio)
            loss, logs = out[0], (out[3] if len(out) > 3 else {})
            loss_scaler(loss / accum_iter, optimizer, clip_grad=args.clip_grad,
                        parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad()
            if after_step is not None:
                after_step(epoch + (step + 1) / steps_per_epoch)
        lr = optimizer.param_groups[0]['lr']
        metric_logger.update(lr=lr)
        reader.record(step, lr, update, loss=loss.detach(), **logs)
        del out, views, noise  # the prediction and the views are not kept alive into the next forward
        if i % args.print_freq == 0 or i == total - 1:  # the read: the one host-device synchronisation
            stop_requested = reader.read() or stop_requested
        if stop_requested and update and i < total - 1:
            step, interrupted = step + 1, True
            break
    if reader.steps:  # stopped between reads: read the rest before anything is saved
        reader.read()
    if not interrupted:
        step = steps_per_epoch
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}, step, interrupted
