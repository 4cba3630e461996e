"""Under DDP the codebook statistics are all-reduced: every rank holds the same codebook."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from models.vqvae2 import VQVAE2, VQVAE2Config
from tests.helpers import tiny_vqvae

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights
    model = VQVAE2(VQVAE2Config(**tiny_vqvae(dead_code_steps=2)))
    ddp = DDP(model, broadcast_buffers=False)  # no buffer copying: the quantizer must sync itself
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    restarts = 0
    for _ in range(6):
        x = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1
        out = ddp(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        restarts += out["restarts/bottom"] + out["restarts/top"]
    state = {k: v for k, v in model.state_dict().items() if "quantizers" in k}
    results[rank] = ({k: v.clone() for k, v in state.items()}, restarts)
    dist.destroy_process_group()


def test_two_rank_ddp_keeps_codebooks_identical():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    (state0, restarts0), (state1, restarts1) = results[0], results[1]
    assert restarts0 == restarts1 and restarts0 > 0  # restarts happened, identically
    assert set(state0) == set(state1)
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    # and the codebooks did move away from their initial values
    assert not torch.equal(state0["quantizers.0.embed"], state0["quantizers.0.embed_sum"])


def _resume_worker(rank: int, world: int, port: int, steps: list[int], root: str, results):
    from pathlib import Path

    from stages.training.harness import LocalSession
    from stages.training.loop import CheckpointError, resume, save_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = VQVAE2(VQVAE2Config(**tiny_vqvae()))
    session = LocalSession(Path(root) / f"rank{rank}", torch.device("cpu"), 1)
    session.rank = 0  # each writes its own checkpoint, as rank 0 would
    step = steps[rank]
    save_checkpoint(session, model, {"step": step}, [], {"step": step})
    session.rank, session.world_size = rank, world
    try:
        _, state, _ = resume(session, model)
        results[rank] = state["step"]
    except CheckpointError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def test_ranks_that_resume_from_different_steps_are_stopped(tmp_path):
    for steps in ([10, 10], [10, 20]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = mp.Manager().dict()
        root = str(tmp_path / "-".join(map(str, steps)))
        mp.spawn(_resume_worker, args=(2, port, steps, root, results), nprocs=2, join=True)
        if steps[0] == steps[1]:
            assert dict(results) == {0: 10, 1: 10}
        else:
            for rank in (0, 1):
                assert results[rank] == (
                    "the workers resumed from different checkpoints (steps 10 to 20): some "
                    "could not load the newest"
                )
