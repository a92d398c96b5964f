"""One pretraining epoch. The model's forward returns (loss, pred, mask[, logs]); a tuple batch of views is
passed to the model as positional arguments (the contrastive model takes two views)."""
import itertools
import math
from contextlib import nullcontext

import util.lr_sched as lr_sched
import util.misc as misc


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, args, mask_gen=None, log_writer=None,
                    start_step=0, stop_flag=None, after_step=None):
    """Returns (stats dict, steps completed in this epoch counting start_step, interrupted: bool)."""
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    accum_iter, device = args.accum_iter, args.device
    steps_per_epoch = start_step + len(data_loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    optimizer.zero_grad()
    step, interrupted = start_step, False
    log_every_step = not args.no_step_log
    total = steps_per_epoch - start_step
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
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f'loss is {loss_value} at epoch {epoch}, step {step}; stopping '
                                    f'(the last checkpoint is left as it was)')
            loss_scaler(loss / accum_iter, optimizer, clip_grad=args.clip_grad,
                        parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad()
            if after_step is not None:
                after_step(epoch + (step + 1) / steps_per_epoch)
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]['lr'],
                             **{k: float(v) for k, v in logs.items()})
        if update and log_every_step:
            loss_reduced = misc.all_reduce_mean(loss_value)  # a collective: every rank takes part
        if log_writer is not None and update and log_every_step:
            epoch_1000x = int((step / steps_per_epoch + epoch) * 1000)  # x-axis comparable across batch sizes
            log_writer.add_scalar('train_loss', loss_reduced, epoch_1000x)
            log_writer.add_scalar('lr', optimizer.param_groups[0]['lr'], epoch_1000x)
            for k, v in logs.items():
                log_writer.add_scalar(f'train_{k}', float(v), epoch_1000x)
        if update and stop_flag is not None and stop_flag.should_stop(device):
            step, interrupted = step + 1, True
            break
    if not interrupted:
        step = steps_per_epoch
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}, step, interrupted
