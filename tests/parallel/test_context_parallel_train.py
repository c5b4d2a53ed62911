"""Context parallelism in the train loop (`pretrain.train.train`): a hybrid of every mixer under
cp 2 x tp 2, cp 2 x dp_shard 2, HSDP (dp_replicate 2) x cp 2 and pp 2 x cp 2 in 4 real gloo
processes against one process with the same seed and global batch; the cp 2 x dp_shard 2
checkpoint resumed in one process (cp 1); and the layout's one-line errors.

The batches are the loader's rows of real text with documents packed back to back, so documents
cross piece boundaries (pieces of 16 tokens, chunks of 8). Every cp rank of a dp group reads the
same rows and takes its piece; losses are summed over a rank's tokens and scaled by the global
token count, gradients summed over dp x cp by FSDP.

Tolerance: float32 (the train loop's widest dtype); per-step losses and gradient norms within 5e-5,
as the other layouts' (tests/parallel/test_parallel_train.py): the same computation, but state
passing sums the pieces' contributions in another order. Exactness in float64 is the mixers' own
test (tests/parallel/test_context_parallel.py)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from checkpoint.manager import find_latest
from parallel.mesh import validate_layout
from pretrain.config import ConfigError, RunConfig
from pretrain.dry_run import estimate_rank, model_activations
from pretrain.estimate import MemoryEstimate
from pretrain.train import train
from tests.distributed import run_distributed
from tests.runs import LAYOUT_RUN, assert_one_error, cli, curve, layout_config, records

TOL = 5e-5
PATTERN = "RM*O | PTGS"  # every mixer; R blocks on both sides of the stage cut
RUN = [f"model.pattern={PATTERN}", "train.seq_len=32", "train.eval_interval=3", "train.eval_batches=2"]
# MoM's and SSE's router balance losses: over the whole rows under cp (each rank adds its share),
# but per replica under dp and per microbatch under pp, where one process cannot match them
# (tests/runs.py LAYOUT_RUN)
AUX = ["model.mixers.mom.aux_loss_scale=0.01", "model.mixers.sse.aux_loss_scale=0.01"]
LAYOUTS = {
    "cp2xtp2": [*AUX, "parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1", "train.batch_size=2"],
    "cp2xdp2": ["parallel.cp=2", "parallel.dp_shard=2", "train.batch_size=1", "train.stop_at_step=2"],
    # evaluation batches have train.batch_size rows: 4 of 1 row are the reference's 2 of 2
    "hsdp2xcp2": ["parallel.cp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1", "train.batch_size=1", "train.eval_batches=4"],
    "pp2xcp2": ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1", "train.batch_size=2", "train.activation_checkpoint=full"],
}


def train_rank(cfg: RunConfig) -> None:
    train(cfg, resume=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Path]:
    """The reference runs: one process, the global batch of every layout (2 rows of 32 tokens),
    with the aux losses or without; each made once."""
    runs: dict[bool, Path] = {}

    def reference(overrides: list[str]) -> Path:
        aux = AUX[0] in overrides
        if aux not in runs:
            runs[aux] = tmp_path_factory.mktemp("one")
            train(layout_config(runs[aux], *RUN, *(AUX if aux else []), "train.batch_size=2"), resume=False)
        return runs[aux]

    return reference


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_layouts_train_as_one_process(tmp_path: Path, one_process: Path, layout: str, capfd: pytest.CaptureFixture) -> None:
    """Losses (with the routers' aux losses under cp 2 x tp 2),
    gradient norms and the evaluation loss (each rank its pieces of the validation rows) of each
    layout equal one process's; pp 2 x cp 2 with every block's activations checkpointed
    (recomputed with the piece it ran with). cp 2 x dp 2 stops at step 2, and one process
    resumes its checkpoint, says that it reshards, and takes step 3 as the reference did."""
    overrides = LAYOUTS[layout]
    one = one_process(overrides)
    run_distributed(train_rank, 4, layout_config(tmp_path, *RUN, *overrides))
    steps = len(curve(tmp_path, "loss"))
    assert steps == (2 if "train.stop_at_step=2" in overrides else 3)
    keys = ["loss", "grad_norm"] + (["aux_loss"] if AUX[0] in overrides else [])
    for key in keys:
        torch.testing.assert_close(curve(tmp_path, key), curve(one, key)[:steps], rtol=0, atol=TOL, msg=key)
    if steps == 3:
        torch.testing.assert_close(curve(tmp_path, "eval_loss"), curve(one, "eval_loss"), rtol=0, atol=TOL)
        assert records(tmp_path)[0]["tokens_per_s"] > 0
        return
    capfd.readouterr()
    train(layout_config(tmp_path, *RUN, "train.batch_size=2"), resume=True)
    assert "ebb: resharding step-00000002 from dp_shard=2 x cp=2 to one process\n" in capfd.readouterr().out
    torch.testing.assert_close(curve(tmp_path, "loss"), curve(one, "loss"), rtol=0, atol=TOL)
    assert find_latest(tmp_path / "checkpoints").name == "step-00000003"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=3"], "parallel.cp (3) must divide train.seq_len (32)"),
        (["parallel.cp=4"], "cuts train.seq_len (32) into pieces of 8 tokens, not whole chunks of model.mixers.mamba2.chunk_size (16)"),
        (["parallel.cp=2", "data.packing=varlen", "train.batch_size=3", "train.seq_len=16"], "train.batch_size * train.seq_len"),
        (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"], "not supported with pp > 1 or cp > 1"),
        (["parallel.cp=2", "model.mixers.mom.capacity=0.5"], "mixers.mom.capacity needs whole documents"),
    ],
)
def test_pieces_that_do_not_fit_are_config_errors(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        layout_config(tmp_path, *RUN, "model.mixers.mamba2.chunk_size=16", *overrides)


def test_dry_run_shards_and_cuts_by_cp(tmp_path: Path) -> None:
    """Under cp 2 a rank holds half the parameters (FSDP shards over dp_shard x cp) and the
    activations of its piece: about half of cp 1's at the same sequence length."""
    def estimate(cp: int) -> MemoryEstimate:
        cfg = layout_config(tmp_path, "model.pattern=M*TG", "train.seq_len=64", f"parallel.cp={cp}", "parallel.dp_shard=1")
        shape = validate_layout(cfg.parallel, cfg.model, cp)
        return estimate_rank(cfg, shape, 0, model_activations(cfg, shape, torch.float32)[0])[0]

    one, two = estimate(1), estimate(2)
    assert two.params == pytest.approx(one.params / 2, rel=1e-3)
    assert 0.4 < two.activations / one.activations < 0.6


@pytest.mark.slow
def test_bad_layouts_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Before anything is built: a world size the layout does not divide (dry run), a sequence
    that cp does not cut into whole chunks (a run), and pretrain.generate under several processes."""
    run = [*LAYOUT_RUN, *RUN, f"train.run_dir={tmp_path / 'run'}"]
    world = cli("pretrain.train", "--dry-run", "--world-size", "6", *run, "parallel.cp=4")
    assert_one_error(world, "world size 6 is not divisible by pp*dp_replicate*cp*tp = 4")
    chunks = cli("pretrain.train", *run, "parallel.cp=2", "train.seq_len=24")
    assert_one_error(chunks, "cuts train.seq_len (24) into pieces of 12 tokens, not whole chunks of model.mixers.rwkv7.chunk_size (8)")
    assert not (tmp_path / "run").exists()
    generate = cli("pretrain.generate", "--checkpoint", str(tmp_path), "--prompt", "x", env={"WORLD_SIZE": "2"})
    assert_one_error(generate, "pretrain.generate decodes in one process, not 2 (WORLD_SIZE)")
