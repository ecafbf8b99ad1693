"""`ShardTrainer` (transformers.Trainer) and `LoopStream`: exact ids per rank, epochs and resume.

The torchrun test runs ``tests/hf_trainer_run.py`` on 2 CPU ranks (gloo): a tiny Llama on packed
rows of 90 documents for about 2.5 epochs, saving a checkpoint every 6 steps; every rank logs
the sample ids of each batch it trains. Then it resumes from two checkpoints (mid-epoch, and one
taken while a rank that ran out of rows trained empty batches), with a DataLoader worker this
time, and compares id by id (harness: ``tests/integration_runs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shardloader import (
    ConfigError,
    PackConfig,
    ResumeError,
    ShardDataset,
    ShardLoader,
    StreamConfig,
)
from shardloader.integrations.stream import LoopStream
from tests.integration_runs import make_small_tokens, run_full_then_resume

SCRIPT = "hf_trainer_run.py"


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_small_tokens(tmp_path_factory.mktemp("trainer-data"), tokenizer_dir)


@pytest.mark.slow
@pytest.mark.torchrun
def test_trainer_reads_each_share_once_moves_epochs_and_resumes_exactly(
    small_tokens: Path, tmp_path: Path
) -> None:
    checkpoints = run_full_then_resume(
        SCRIPT, str(small_tokens), tmp_path, lambda step: tmp_path / "run" / f"checkpoint-{step}"
    )
    assert all((c / "shardloader_state.json").is_file() for c in checkpoints)


# --- in one process ---------------------------------------------------------------------------


def make_loader(data: Path) -> ShardLoader:
    dataset = ShardDataset(str(data), config=StreamConfig(seed=1), pack=PackConfig(seq_len=32))
    return ShardLoader(dataset, batch_size=2)


@pytest.fixture
def packed_loader(small_tokens: Path) -> ShardLoader:
    return make_loader(small_tokens)


def ids(batch: dict[str, Any]) -> list[int]:
    return [int(i) for i in batch["sample_ids"]]


def test_a_stream_fetching_ahead_saves_the_position_of_the_trained_batches(
    small_tokens: Path,
) -> None:
    # As Lightning does: fetch batch k+1, then train batch k, then save.
    whole = [ids(b) for b in make_loader(small_tokens)]
    assert len(whole) > 12
    for trained in (1, 5, len(whole) - 1, len(whole)):
        stream = LoopStream(make_loader(small_tokens), batch_size=2, ahead=True)
        batches = iter(stream)
        next(batches)
        for _ in range(trained):
            next(batches, None)
            stream.batch_trained()
        state = json.loads(json.dumps(stream.loader_state()))
        again = make_loader(small_tokens)
        again.load_state_dict(state)
        rest = [ids(b) for b in again]
        if trained == len(whole):  # the epoch is done: the state starts the next one
            assert again.shard_dataset.epoch == 1
            assert sorted(set(sum(rest, []))) == sorted(set(sum(whole, [])))
        else:
            assert rest == whole[trained:], trained


def test_a_stream_counts_what_was_trained(packed_loader: ShardLoader) -> None:
    stream = LoopStream(packed_loader, batch_size=2, ahead=True)
    batches = iter(stream)
    for _ in range(3):
        next(batches)
    with pytest.raises(ConfigError, match="3 batches were fetched and 0 trained"):
        stream.loader_state()


def test_accelerate_would_rebuild_our_loader(packed_loader: ShardLoader) -> None:
    # Why ShardTrainer never hands its loader to accelerate: prepare() returns accelerate's own
    # DataLoader class, which has lost our state_dict; by default it reads on rank 0 and
    # dispatches batches, else (over several processes) it re-splits what each rank reads.
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    dispatched = Accelerator(cpu=True).prepare(packed_loader)
    assert type(dispatched).__name__ == "DataLoaderDispatcher"
    config = DataLoaderConfiguration(dispatch_batches=False, split_batches=False)
    sharded = Accelerator(cpu=True, dataloader_config=config).prepare(packed_loader)
    assert type(sharded).__name__ == "DataLoaderShard"
    assert not isinstance(dispatched, ShardLoader)
    assert not isinstance(sharded, ShardLoader)


def test_the_trainer_needs_max_steps_and_a_shard_dataset(
    small_tokens: Path, tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from shardloader.integrations.transformers import ShardTrainer, read_loader_state

    config = LlamaConfig(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    dataset = ShardDataset(str(small_tokens), pack=PackConfig(seq_len=32))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    steps = TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to="none")
    with pytest.raises(ConfigError, match="set TrainingArguments\\(max_steps=...\\)"):
        ShardTrainer(model=model, args=args, train_dataset=dataset)
    with pytest.raises(ConfigError, match="ShardTrainer trains on a ShardDataset, got list"):
        ShardTrainer(model=model, args=steps, train_dataset=[1, 2])
    with pytest.raises(ResumeError, match="no data position in this checkpoint"):
        read_loader_state(tmp_path)


def test_packed_batches_reach_the_model_without_bookkeeping(packed_loader: ShardLoader) -> None:
    from shardloader.integrations.transformers import PACKED_KEYS
    from shardloader.pack_attention import model_inputs

    batch = next(iter(packed_loader))
    assert set(batch) >= PACKED_KEYS
    inputs = model_inputs(batch)
    assert not PACKED_KEYS & set(inputs)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
