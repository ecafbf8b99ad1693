"""`ShardDataModule` (Lightning DDP on 2 CPU ranks under torchrun): exact ids, epochs and resume.

``tests/lightning_run.py`` trains a tiny Llama on packed rows with ``Trainer(accelerator="cpu",
devices=2, strategy="ddp", use_distributed_sampler=False)`` and a ``ModelCheckpoint`` every 6
steps; the checks are those of the transformers test (``tests/integration_runs.py``). Lightning
fetches one batch ahead of the step it trains, so an exact resume here also checks that the
saved position is that of the trained batches, not of the fetched ones.
"""

from __future__ import annotations

from pathlib import Path

import lightning  # noqa: F401 - the dev extra installs it: a missing one fails, it does not skip
import pytest

from tests.integration_runs import make_small_tokens, run_full_then_resume

SCRIPT = "lightning_run.py"


@pytest.mark.slow
@pytest.mark.torchrun
def test_lightning_reads_each_share_once_moves_epochs_and_resumes_exactly(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, tmp_path: Path
) -> None:
    data = str(make_small_tokens(tmp_path_factory.mktemp("lightning-data"), tokenizer_dir))
    run_full_then_resume(
        SCRIPT, data, tmp_path, lambda step: tmp_path / "ckpt" / f"step={step}.ckpt"
    )


def test_the_data_module_keeps_a_loaded_position_for_its_loader(tmp_path: Path) -> None:
    from shardloader import ConfigError
    from shardloader.integrations.lightning import ShardDataModule

    with pytest.raises(ConfigError, match="ShardDataModule needs a ShardDataset, got list"):
        ShardDataModule([1], batch_size=2)  # type: ignore[arg-type]
