"""One fine-tuning / linear-probing epoch, evaluation (Acc@1, Acc@5, loss), and the epoch loop both use."""
import datetime
import itertools
import json
import os
import time
from contextlib import nullcontext

import torch
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.meters as meters
import util.misc as misc
from util.checkpoint import checkpoint_args, rng_state, save_epoch
from util.launch import resume_training


def train_one_epoch(model, criterion, data_loader, optimizer, epoch, loss_scaler, args, mixup_fn=None,
                    log_writer=None):
    """One epoch; the loss stays on the device and is read every --print_freq steps and at the end of the epoch
    (util.meters.StepReader: non-finite check, TensorBoard 'loss' and 'lr' per optimizer step)."""
    model.train(True)
    metric_logger = meters.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', meters.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    accum_iter, device = args.accum_iter, args.device
    total = min(len(data_loader), args.max_steps_per_epoch or len(data_loader))
    reader = meters.StepReader(args, epoch, total, metric_logger, log_writer, tag_prefix='')
    optimizer.zero_grad()
    batches = itertools.islice(data_loader, total)
    for step, (samples, targets) in enumerate(metric_logger.log_every(batches, args.print_freq, f'Epoch: [{epoch}]', total)):
        if step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, step / total + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (step + 1) % accum_iter == 0
        # no all-reduce mid-group: DDP decides at forward time, so the forward runs inside no_sync too
        with model.no_sync() if args.distributed and not update else nullcontext():
            with misc.autocast(args):
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=getattr(args, 'clip_grad', None),
                        parameters=[p for p in model.parameters() if p.requires_grad], update_grad=update)
        del outputs  # not kept alive into the next forward
        if update:
            optimizer.zero_grad()
        lr = max(g['lr'] for g in optimizer.param_groups)
        metric_logger.update(lr=lr)
        reader.record(step, lr, update, loss=loss.detach())
        if step % args.print_freq == 0 or step == total - 1:  # the read: the one host-device synchronisation
            reader.read()
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, args):
    """Prints '* Acc@1 x Acc@5 y loss z' and returns the averages. The per-batch values stay on the device
    until log_every prints (every 10 batches) and the end."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = meters.MetricLogger(delimiter='  ')
    model.eval()
    for images, target in metric_logger.log_every(data_loader, 10, 'Test:'):
        images = images.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        with misc.autocast(args):
            output = model(images)
        output = output.float()
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        metric_logger.update(n=images.shape[0], loss=loss, acc1=acc1, acc5=acc5)  # queued on the device
    metric_logger.synchronize_between_processes()
    m = metric_logger.meters
    print(f"* Acc@1 {m['acc1'].global_avg:.3f} Acc@5 {m['acc5'].global_avg:.3f} loss {m['loss'].global_avg:.3f}")
    return {k: meter.global_avg for k, meter in m.items()}


def fit(args, model, model_without_ddp, optimizer, criterion, loader_train, loader_val, mixup_fn=None):
    """The epoch loop of fine-tuning and linear probing: resume, train, evaluate, checkpoint
    (output_dir/checkpoint.pth every epoch); with --eval only the evaluation of --resume."""
    loss_scaler = misc.LossScaler(args.device.type, enabled=args.amp == 'fp16')
    args.start_epoch = resume_training(args, model_without_ddp, optimizer, loss_scaler) or args.start_epoch
    if args.eval:
        evaluate(loader_val, model, args)
        return
    log_writer = None
    if misc.is_main_process() and args.output_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    print(f'start training for {args.epochs} epochs')
    start_time, max_accuracy = time.time(), 0.0
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, epoch, loss_scaler, args,
                                      mixup_fn=mixup_fn, log_writer=log_writer)
        if args.output_dir:
            save_epoch({'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
                        'scaler': loss_scaler.state_dict(), 'rng': rng_state(), 'args': checkpoint_args(args)},
                       args.output_dir, args.save_freq, args.epochs)
        test_stats = evaluate(loader_val, model, args)
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        print(f'accuracy on {len(loader_val.dataset)} test images: {test_stats["acc1"]:.1f}%, max {max_accuracy:.2f}%')
        if log_writer is not None:
            for k in ('acc1', 'acc5', 'loss'):
                log_writer.add_scalar(f'perf/test_{k}', test_stats[k], epoch)
            log_writer.flush()
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()}, 'epoch': epoch}
        if args.output_dir and misc.is_main_process():
            with open(os.path.join(args.output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
                f.write(json.dumps(log_stats) + '\n')
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
