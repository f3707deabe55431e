"""Test helpers that build the Duo codebase's own objects (its hydra configs,
``algo.DUO`` / ``algo.Distillation`` with its ``models.dit.DIT``) on a CPU,
offline: a word-level tokenizer and a tiny GPT-2 written to a temp folder
stand in for the hub downloads its ``metrics.Metrics`` makes.

The Duo code comes from ``$DUO_REFERENCE_DIR`` or ``../shared/duo-reference``
(duo_fast.integrations.duo_reference); tests skip with the reason when it or
its PyPI dependencies (requirements-duo.txt) are missing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


K_SMALL = 256  # the vocabulary of the tests' word-level tokenizer


def load_reference():
    from duo_fast.integrations import duo_reference

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return duo_reference.load()
    except duo_reference.ReferenceUnavailable as e:
        pytest.skip(f"Duo codebase unavailable: {e}")


def make_tokenizer(vocab_size: int, folder: Path):
    from duo_fast.integrations.duo_reference import word_tokenizer

    tok = word_tokenizer(vocab_size, folder)
    assert len(tok) == vocab_size
    return tok


def save_tiny_gpt2(folder: Path, tokenizer) -> None:
    """A 1-layer GPT-2 with random weights beside the tokenizer in ``folder``
    (the eval model of ``Metrics.record_generative_perplexity``)."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)


def make_config(ref, tokenizer_dir: Path, overrides=(), *, algo="duo"):
    from duo_fast.integrations.duo_reference import compose_config

    return compose_config(ref, tokenizer_dir, overrides, algo=algo)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Random weights everywhere (the DiT zero-initialises its output layer and
    adaLN, which would make its logits ignore the input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_dataloader(vocab_size: int, length: int = 32, batch_size: int = 4, n: int = 64):
    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, vocab_size, (length,), generator=g),
                    "attention_mask": torch.ones(length, dtype=torch.long)}

    return torch.utils.data.DataLoader(_Data(), batch_size=batch_size, num_workers=1)


def lightning_fit(model, vocab_size: int, steps: int, **trainer_kwargs):
    """``steps`` training steps of the Duo code's LightningModule with a real
    lightning.Trainer on CPU (``trainer_kwargs``: e.g. precision,
    accumulate_grad_batches); returns the trainer and the per-batch losses it logged."""
    import lightning as L

    losses = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[_Record()], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, tiny_dataloader(vocab_size))
    return trainer, losses


def write_text_data(folder: Path, tokenizer, lines: int = 300, seed: int = 0) -> Path:
    """A local text dataset as `datasets.load_dataset(folder)` reads it
    (``train.txt``, ``validation.txt``: one document per line) of the words of
    ``tokenizer`` (a :func:`make_tokenizer` word-level tokenizer)."""
    import random

    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if not w.startswith("[")]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", lines), ("validation", max(8, lines // 10))):
        with open(folder / f"{split}.txt", "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))) + "\n")
    return folder


@pytest.fixture(scope="module")
def ref():
    """The Duo codebase's modules (the test skips, with the reason, without them)."""
    return load_reference()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A folder with a K_SMALL-id word-level tokenizer and a tiny GPT-2 (the gen-PPL eval model)."""
    folder = tmp_path_factory.mktemp("tok")
    save_tiny_gpt2(folder, make_tokenizer(K_SMALL, folder))
    return folder
