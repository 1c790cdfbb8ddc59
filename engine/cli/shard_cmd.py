"""`cmvae-engine data shard`: write one split as WebDataset tar shards for the streaming loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.resolve import resolve_dataset

EXIT_DATA_ERROR = 2


def shard_command(
    dataset: Annotated[str, typer.Argument(help="`polydigits`, `polymnist` or a data folder.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for {split}-000000.tar ... and {split}-index.json.")],
    split: Annotated[str, typer.Option(help="Split to write (train, valid or test).")] = "train",
    tuples_per_shard: Annotated[int, typer.Option(help="Tuples per tar shard (the last one may hold fewer).")] = 2000,
    encoding: Annotated[str, typer.Option(help="`npy` (raw pixels, fastest to read) or `png` (smaller; DALI "
                                               "decodes it on the GPU).")] = "npy",
    data_root: Annotated[Path | None, typer.Option(help="Folder of named data sets (default $CMVAE_DATA_DIR "
                                                        "or ./data).")] = None,
) -> None:
    """Write SPLIT of DATASET as WebDataset shards (for `--loader webdataset` and `--loader dali`)."""
    from cmvae_engine.engine.shards import write_shards  # webdataset is an optional extra: import only when sharding

    console = Console(soft_wrap=True)
    try:
        index = write_shards(resolve_dataset(dataset, data_root=data_root), out_dir, split=split,
                             tuples_per_shard=tuples_per_shard, encoding=encoding)
    except DataError as err:
        # Text, not markup: messages hold paths and brackets that rich would otherwise interpret.
        Console(stderr=True, soft_wrap=True).print(Text(f"error: {err}", style="red"))
        raise typer.Exit(EXIT_DATA_ERROR) from None
    size_mb = sum(e.bytes for e in index.shards) / 1e6
    console.print(f"wrote {len(index.shards)} shards ({index.n} {split} tuples, {index.n_modalities} modalities, "
                  f"{index.encoding}, {size_mb:.1f} MB) and {index.path}", markup=False)
