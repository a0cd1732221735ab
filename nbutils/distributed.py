"""Training on several processes (GPUs, or CPU processes) with Hugging Face ``accelerate``.

Nothing here is needed on one process, which is how the notebooks train: :func:`processes` then returns
:class:`OneProcess`, whose every method is a no-op. Launched by ``accelerate launch`` (or ``torchrun``),
``WORLD_SIZE`` is above 1 and :func:`processes` returns :class:`ManyProcesses`, built on
``accelerate.Accelerator`` (which sets up ``torch.distributed`` — NCCL on GPUs, gloo on CPUs — and wraps the
model in ``DistributedDataParallel``)::

    pip install -e '.[distributed]'
    accelerate launch --multi_gpu --num_processes 2 -m nbutils train-unet --preset full --run-dir runs/full
    # on a machine without GPUs the same command starts two CPU processes (gloo); so does
    torchrun --nproc_per_node 2 -m nbutils train-unet --preset smoke
    # (not `accelerate launch --cpu --num_processes 2`: that needs mpirun and otherwise starts one process)

**N processes compute the same run as one.** ``batch_size`` in the config is the *global* batch. Every
process walks the same shuffled order (same seeded generator), draws the same random numbers for the whole
global batch (timesteps, noise, label dropout; the VAE's posterior noise), and keeps only its own share
(:meth:`ManyProcesses.shard`: contiguous pieces whose sizes differ by at most one). DDP *averages* the gradients
of the N processes; each process's loss is multiplied by ``N·n_r/B`` (``n_r`` = its share of the ``B``
examples) so that average is exactly the gradient of the global batch's mean loss, also for an uneven last
batch. The learning rate therefore needs no change: the run is the single-process run, split. A run with a
bigger global batch is a *different* run; the usual rule of thumb is to scale the learning rate with it
(linear scaling, Goyal et al. 2017, "Accurate, Large Minibatch SGD"); we leave that choice to the config.

Differences from one process are floating-point ones (the all-reduce sums in another order) plus dropout:
its masks come from each process's own RNG, so with ``dropout > 0`` the runs agree in distribution rather
than number for number (``tests/test_distributed.py`` compares with dropout 0).

Only process 0 prints, shows progress bars, writes checkpoints, sample grids and the latent cache; the
others wait at :meth:`ManyProcesses.barrier` where they need its files. The training state holds nothing per
process, so a run can be resumed with a different number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


class OneProcess:
    """The ordinary single-process case: every method is a no-op or the identity."""

    world_size = 1
    rank = 0
    is_main = True

    def device(self, requested: torch.device) -> torch.device:
        return requested

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors

    def loss_factor(self, n_global: int) -> float:
        return 1.0

    def combine(self, parts: dict, n_global: int) -> dict:
        return parts

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log

    @contextmanager
    def main_first(self):
        yield


class ManyProcesses(OneProcess):
    """One of ``world_size`` processes started by ``accelerate launch``; see the module docstring."""

    def __init__(self, cpu: bool):
        try:
            from accelerate import Accelerator
        except ImportError as exc:
            raise RuntimeError(
                f"started as one of {os.environ.get('WORLD_SIZE')} processes, but Hugging Face accelerate is not "
                "installed: pip install -e '.[distributed]' (or pip install accelerate)"
            ) from exc
        # mixed precision stays ours (nbutils.train.autocast_dtype), identical on one process and on many
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no")
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process

    def device(self, requested: torch.device) -> torch.device:
        device = self.accelerator.device  # cuda:LOCAL_RANK on GPUs
        return torch.device("cpu") if device.type == "cpu" else device

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.accelerator.prepare_model(model, device_placement=False)

    def _bounds(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lo, hi = self._bounds(len(tensors[0]))
        return tuple(t[lo:hi] for t in tensors)

    def loss_factor(self, n_global: int) -> float:
        lo, hi = self._bounds(n_global)
        return self.world_size * (hi - lo) / n_global

    def _sum(self, values: list) -> list[float]:
        v = torch.stack([torch.as_tensor(x, dtype=torch.float64).to(self.accelerator.device) for x in values])
        torch.distributed.all_reduce(v)
        return v.tolist()

    def combine(self, parts: dict, n_global: int) -> dict:
        """The global batch's loss parts: share-weighted sums of every process's, so every process logs the
        same numbers and stops on a non-finite loss at the same step."""
        lo, hi = self._bounds(n_global)
        keys = sorted(parts)
        shares = [torch.as_tensor(parts[k], dtype=torch.float64) * (hi - lo) / n_global for k in keys]
        return dict(zip(keys, self._sum(shares), strict=True))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (a stop request reaches them all at the same step)."""
        return self._sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.is_main else (lambda message: None)

    @contextmanager
    def main_first(self):
        """Process 0 runs the block first (e.g. writes a cache); the others run it after it is done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def is_main_process() -> bool:
    """False in processes 1..N-1 of a multi-process launch (for printing results once)."""
    return os.environ.get("RANK", "0") == "0"


def launched_processes() -> int:
    """How many processes this run was started as (``$WORLD_SIZE``, set by accelerate launch / torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def processes(device: torch.device) -> OneProcess:
    """:class:`OneProcess`, or :class:`ManyProcesses` when launched as several processes."""
    if launched_processes() == 1:
        return OneProcess()
    return ManyProcesses(cpu=device.type == "cpu")
