"""The TransferQueue: Arrow rows in, leased micro-batches out, columns added in between."""

from asyncflow.runtime.queue import samplers
from asyncflow.runtime.queue.transfer_queue import Lease, QueueFull, TransferQueue

__all__ = ["Lease", "QueueFull", "TransferQueue", "samplers"]
