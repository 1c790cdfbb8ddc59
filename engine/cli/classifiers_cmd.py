"""`cmvae-engine classifiers train DATASET`: the digit classifiers that coherence is measured with."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cmvae_engine.cmvae.checks import COUNT, SEED, THREADS, Rule, check_flags
from cmvae_engine.cmvae.data.errors import DataError

if TYPE_CHECKING:
    from cmvae_engine.cmvae.evaluation.classifier import DigitClassifier

classifiers_app = typer.Typer(help="Digit classifiers for coherence.", no_args_is_help=True)
Opt = typer.Option


def write_classifier_folder(out: str | Path, models: list[DigitClassifier], record: dict) -> Path:
    """`{out}/m{i}.pt` (state dicts in the reference's key layout), then `{out}/classifiers.json` last, so a
    folder with the JSON always has every weight file."""
    import torch

    from cmvae_engine.cmvae.evaluation.classifier import OWN_FILE, OWN_META
    from cmvae_engine.engine.checkpoint import atomic_write_bytes, atomic_write_json

    out = Path(out)
    for m, model in enumerate(models):
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        atomic_write_bytes(out / OWN_FILE.format(m), buf.getvalue())
    atomic_write_json(out / OWN_META, record)
    return out


@classifiers_app.command("train")
def train_command(
    dataset: Annotated[str, typer.Argument(help="`polydigits`, `polymnist` or a data folder.")],
    epochs: Annotated[int, Opt(help="Passes over the train split.")] = 10,
    out: Annotated[Path | None, Opt(help="Output folder (default DATASET_FOLDER/classifiers).")] = None,
    batch_size: Annotated[int, Opt(help="Images per step.")] = 128,
    lr: Annotated[float, Opt(help="Adam learning rate.")] = 1e-3,
    max_steps: Annotated[int | None, Opt(help="Stop each classifier after this many steps.")] = None,
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default $CMVAE_DATA_DIR or ./data).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of initialisation and data order.")] = 0,
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
) -> None:
    """Train one digit classifier per modality on the train split; records test accuracy beside the weights."""
    from cmvae_engine.cmvae.data import read_dataset
    from cmvae_engine.cmvae.evaluation.classifier import (
        OWN_DIR,
        OWN_FILE,
        OWN_META,
        train_classifier_set,
        weak_classifiers,
    )
    from cmvae_engine.engine.progress import Board
    from cmvae_engine.engine.trainer import resolve_device, resolve_with_progress

    console = Console()
    try:
        check_flags(("--epochs", epochs, COUNT, 10), ("--batch-size", batch_size, COUNT, 128),
                    ("--lr", lr, Rule(float, low=0, low_open=True), 1e-3),
                    ("--max-steps", max_steps, Rule(int, low=1, optional=True), 100), ("--seed", seed, SEED, 0),
                    ("--threads", threads, THREADS, 1))
        if threads:
            import torch

            torch.set_num_threads(threads)
        root = resolve_with_progress(dataset, data_root, console)
        ds = read_dataset(root)
        dev = resolve_device(device)
        console.print(f"training {ds.n_modalities} digit classifiers on {ds.name} ({ds.split('train').n} train "
                      f"tuples, {epochs} epochs) on {dev}", markup=False)
        with Board(console) as board, board.phase(f"training {ds.n_modalities} classifiers") as bar:
            models, record = train_classifier_set(
                ds.splits, dataset=str(root), epochs=epochs, batch_size=batch_size, lr=lr, device=dev, seed=seed,
                max_steps=max_steps, log=lambda s: console.print(s, markup=False), progress=bar,
                architectures=_architectures(ds))
        folder = write_classifier_folder(out or root / OWN_DIR, models, record)
    except (DataError, ValueError, FileNotFoundError) as e:
        Console(stderr=True, soft_wrap=True).print(Text(f"error: {e}", style="red"))
        raise typer.Exit(2) from None
    table = Table("modality", "test accuracy", title=f"Digit classifiers ({record['train_seconds']:.1f}s)")
    for m, a in enumerate(record["test_accuracy"]):
        table.add_row(ds.modality_names[m], f"{a:.4f}")
    console.print(table)
    console.print(f"wrote {folder}/ ({OWN_FILE.format('{i}')}, {OWN_META}); `cmvae-engine eval` finds them there"
                  if out is None else f"wrote {folder}/; pass --classifiers {folder} to `cmvae-engine eval`",
                  markup=False)
    warning = weak_classifiers(record["test_accuracy"], record["n_classes"])
    if warning:
        console.print(Text("warning: ", style="bold yellow") + Text(warning))


def _architectures(ds) -> list[dict] | None:
    """Per-modality classifiers for data with captions or images other than 28x28 (None: DigitClassifiers)."""
    from cmvae_engine.cmvae.data.format import modality_info
    from cmvae_engine.cmvae.evaluation.modality_classifiers import architecture_of

    info = modality_info(ds)
    if all(m["kind"] == "image" and m["shape"][1:] == [28, 28] for m in info):
        return None
    return [architecture_of(m) for m in info]
