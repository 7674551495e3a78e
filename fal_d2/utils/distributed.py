"""Keep every worker's model buffers equal to the main process's before it is evaluated."""
import torch
import torch.distributed as dist

import detectron2.utils.comm as comm

__all__ = ["broadcast_buffers_from_main_process", "end_distributed_run"]


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


def end_distributed_run() -> None:
    """Wait for every worker, then tear the process group down. Detectron2 v0.6's ``launch``
    lets each worker exit as soon as its own work is done; a worker that exits while another is
    still in a gloo call makes that one abort ("terminate called without an active exception").
    A no-op in a single process."""
    if comm.get_world_size() == 1:
        return
    comm.synchronize()
    dist.destroy_process_group()
