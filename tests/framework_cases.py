"""Framework adapters on every rank of a RankPool: accelerate and Lightning over gloo.

Each function runs a real framework in the pool's process group (the frameworks find
it initialised and use it) and returns what the test compares across runs.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

SEED_DATA = 1234


@contextmanager
def launched_as(rank: int, world: int):
    """The environment ``torchrun`` gives a process, for as long as the framework runs."""
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world, "NODE_RANK": 0}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def bits(module_or_tensors) -> dict[str, bytes]:
    """Every tensor's bytes, by name: equal bits, not just close values."""
    items = module_or_tensors.items() if isinstance(module_or_tensors, dict) else module_or_tensors
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for k, v in items}


def _local(tensors: dict) -> dict:
    """This rank's shard of each DTensor (and plain tensors as they are)."""
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}


def optimizer_bits(optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    sd = optimizer.state_dict()
    flat = {f"{p}.{k}": v for p, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    return bits(_local(flat))


# --- accelerate ------------------------------------------------------------------------------


class Counter:
    """An object registered with ``accelerator.register_for_checkpointing``."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, sd: dict) -> None:
        self.seen = sd["seen"]


def _accelerate_job(init_seed: int):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_net(init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, scheduler, counter


def _accelerate_steps(job, n: int) -> list[float]:
    """Batches drawn from the global RNGs, dropout: the losses depend on every RNG state."""
    accelerator, model, optimizer, scheduler, counter = job
    losses = []
    for _ in range(n):
        x = torch.randn(4, 8) * float(np.random.uniform(0.5, 1.5)) + random.random()
        with accelerator.accumulate(model):  # counts accelerator.step
            loss = model(x).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        counter.seen += len(x)
        losses.append(loss.item())
    return losses


def _accelerate_outcome(job) -> tuple:
    accelerator, model, optimizer, scheduler, counter = job
    return bits(model.state_dict()), optimizer_bits(optimizer), scheduler.state_dict(), counter.seen


def accelerate_save_resume(rank: int, world: int, path: str, steps: int, save_at: int) -> dict:
    """Train, save at ``save_at``, go on; then a fresh job loads and goes on: both runs' results."""
    from accelerate.state import AcceleratorState

    from stashpoint.integrations.accelerate import load_state, save_state

    with launched_as(rank, world):
        try:
            torch.manual_seed(SEED_DATA + rank)
            np.random.seed(rank)
            random.seed(rank)
            job = _accelerate_job(init_seed=1)
            _accelerate_steps(job, save_at)
            save_state(job[0], path)
            reference = _accelerate_steps(job, steps - save_at)
            want = _accelerate_outcome(job)

            torch.manual_seed(99)  # another job: other weights, other RNG states
            resumed = _accelerate_job(init_seed=2)
            load_state(resumed[0], path)
            step_after_load = resumed[0].step
            losses = _accelerate_steps(resumed, steps - save_at)
            got = _accelerate_outcome(resumed)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return {
        "reference": reference,
        "resumed": losses,
        "same_state": want == got,
        "step_after_load": step_after_load,
        "files": sorted(os.listdir(path)),
    }


# --- Lightning --------------------------------------------------------------------------------


def _lightning_module(init_seed: int, sharded: bool):
    import pytorch_lightning as pl
    from torch.distributed.fsdp import fully_shard

    class Regression(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = tiny_net(init_seed)
            self.losses: list[float] = []

        def training_step(self, batch, _index):
            (x,) = batch
            loss = self.net(x).pow(2).mean()  # dropout: the losses depend on the RNG states
            self.losses.append(loss.item())
            return loss

        def configure_model(self) -> None:
            if sharded:  # FSDP2 over the data-parallel mesh: parameters and Adam states are DTensors
                mesh = self.device_mesh["data_parallel"]
                for layer in (self.net[0], self.net[3]):
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Regression()


def _lightning_fit(root: str, epochs: int, init_seed: int, sharded: bool, ckpt_path: str | None = None):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from stashpoint.integrations.lightning import StashpointDDPStrategy, StashpointModelParallelStrategy

    if sharded:
        strategy = StashpointModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = StashpointDDPStrategy()
    model = _lightning_module(init_seed, sharded)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"))],  # keeps the newest: removes
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, model


def lightning_save_resume(rank: int, world: int, root: str, epochs: int, save_at: int, sharded: bool) -> dict:
    """Fit ``epochs`` epochs; fit ``save_at`` in another run, resume it to ``epochs``: both runs' results."""
    from stashpoint import read_index

    with launched_as(rank, world):
        whole, whole_model = _lightning_fit(os.path.join(root, "whole"), epochs, 1, sharded)
        first, first_model = _lightning_fit(os.path.join(root, "run"), save_at, 1, sharded)
        ckpt = first.checkpoint_callback.best_model_path
        # another job: other weights, other RNG states
        resumed, model = _lightning_fit(os.path.join(root, "run2"), epochs, 2, sharded, ckpt_path=ckpt)
    return {
        "misuse": _rank0_only_save_refused(ckpt + ".other"),
        "reference": whole_model.losses,
        "before": first_model.losses,
        "resumed": model.losses,
        "same_weights": bits(_local(whole_model.state_dict())) == bits(_local(model.state_dict())),
        "same_optimizer": optimizer_bits(whole.optimizers[0]) == optimizer_bits(resumed.optimizers[0]),
        "global_step": resumed.global_step,
        "checkpoint": ckpt,
        "files": sorted(os.listdir(ckpt)),
        "kept": sorted(os.listdir(os.path.join(root, "whole", "ckpt"))),
        "sharded_items": sorted(n for n, it in read_index(ckpt).items.items() if getattr(it, "layout", None)),
    }


def _rank0_only_save_refused(path: str) -> str:
    """What the plugin says when a strategy calls it on one rank (Lightning's own DDPStrategy does)."""
    from stashpoint.errors import InvalidOptionError
    from stashpoint.integrations.lightning import StashpointCheckpointIO

    try:
        StashpointCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, path)
    except InvalidOptionError as exc:
        return str(exc)
    return "saved"



def checkpoint_io_eager(rank: int, world: int, path: str) -> dict:
    """The plugin's asynchronous mode, called on every rank as the strategies do."""
    from stashpoint.errors import InvalidOptionError
    from stashpoint.integrations.lightning import StashpointCheckpointIO

    try:
        StashpointCheckpointIO(mode="lazy")
        lazy = "accepted"
    except InvalidOptionError as exc:
        lazy = str(exc)
    io = StashpointCheckpointIO(mode="eager")
    checkpoint = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 4, "betas": (0.9, 0.99)}
    with io.on_every_rank():
        io.save_checkpoint(checkpoint, path)
    pending = io._pending is not None
    back = io.load_checkpoint(path, map_location="cpu")  # waits for the save first
    same = torch.equal(back["state_dict"]["w"], checkpoint["state_dict"]["w"])
    same = same and back["betas"] == (0.9, 0.99)
    return {"lazy": lazy, "pending": pending, "same": same, "epoch": back["epoch"]}
