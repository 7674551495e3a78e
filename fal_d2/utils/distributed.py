"""Keep every worker's model buffers equal to the main process's before it is evaluated."""
import torch
import torch.distributed as dist

import detectron2.utils.comm as comm

__all__ = ["broadcast_buffers_from_main_process"]


def broadcast_buffers_from_main_process(model: torch.nn.Module) -> None:
    """
    Copy the main process's buffers (BatchNorm running statistics) into every worker's model.

    Detectron2's DefaultTrainer wraps the model in DistributedDataParallel with
    ``broadcast_buffers=False``, so each worker's running statistics follow its own batches, and
    an evaluation split over the workers would mix several models. The checkpoint holds the main
    process's buffers: after this call, every worker evaluates exactly the saved model.
    A no-op in a single process.
    """
    if comm.get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
