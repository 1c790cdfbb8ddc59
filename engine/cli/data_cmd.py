"""`cmvae-engine data ...`: create, convert and inspect data sets."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cmvae_engine.cmvae.checks import COUNT, SEED, ConfigError, Rule, check_flags
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import SPLITS, MultimodalSplit, read_dataset
from cmvae_engine.cmvae.data.polydigits import synth_polydigits
from cmvae_engine.cmvae.data.polymnist import convert_polymnist
from cmvae_engine.cmvae.data.resolve import default_data_root, resolve_dataset
from cmvae_engine.engine.cli.shard_cmd import shard_command

data_app = typer.Typer(help="Create, convert and inspect data sets.", no_args_is_help=True)
data_app.command("shard")(shard_command)
SYNTHETIC = ("polydigits", "facetdigits", "polydigits-captions")
CONVERTIBLE = ("polymnist", "cubicc")
EXIT_DATA_ERROR = 2

Opt = typer.Option
Arg = typer.Argument
P = ParamSpec("P")
R = TypeVar("R")
DataRootOpt = Annotated[
    Path | None, Opt(help="Folder of named data sets (default $CMVAE_DATA_DIR or ./data).")
]


def _console(stderr: bool = False) -> Console:
    # Built per call so output goes to the current sys.stdout/sys.stderr (the test runner swaps them).
    return Console(stderr=stderr, soft_wrap=True)


def _clean_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Report DataError (bad data) and ConfigError (a bad flag) as one red line and exit code 2: the message
    already says what to fix."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (DataError, ConfigError) as err:
            # Text, not markup: messages hold paths and brackets that rich would otherwise interpret.
            _console(stderr=True).print(Text(f"error: {err}", style="red"))
            raise typer.Exit(EXIT_DATA_ERROR) from None

    return run


@data_app.command("synth")
@_clean_errors
def synth(
    name: Annotated[str, Arg(help=f"Synthetic data set to make: {', '.join(SYNTHETIC)}.")],
    out: Annotated[
        Path | None, Opt(help="Output folder (default DATA_ROOT/NAME, or NAME-mM for M != 5).")
    ] = None,
    modalities: Annotated[int, Opt(help="Number of modalities M (2..8).")] = 5,
    n_train: Annotated[int, Opt(help="Training tuples.")] = 10000,
    n_valid: Annotated[int, Opt(help="Validation tuples (0: no valid split).")] = 1000,
    n_test: Annotated[int, Opt(help="Test tuples.")] = 2000,
    seed: Annotated[int, Opt(help="Seed: the same seed gives identical files.")] = 0,
) -> None:
    """Generate a synthetic data set offline (PolyDigits: PolyMNIST-like, from scikit-learn's digits)."""
    if name not in SYNTHETIC:
        raise DataError(f"unknown synthetic data set {name!r}", fix=f"choose one of: {', '.join(SYNTHETIC)}")
    check_flags(("--modalities", modalities, Rule(int, low=2, high=8), 5), ("--n-train", n_train, COUNT, 10000),
                ("--n-valid", n_valid, Rule(int, low=0), 1000), ("--n-test", n_test, COUNT, 2000),
                ("--seed", seed, SEED, 0))
    if out is None:
        out = default_data_root() / (name if modalities == 5 or name != "polydigits" else f"{name}-m{modalities}")
    from cmvae_engine.engine.progress import Board

    if name == "facetdigits":  # one modality, two labelled factors (cmvae/data/facetdigits.py)
        from cmvae_engine.cmvae.data.facetdigits import synth_facetdigits

        with Board(_console()) as board, board.phase(f"synthesising {name} into {out}") as bar:
            path = synth_facetdigits(out, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed, progress=bar)
        _console().print(f"wrote {name} (1 modality, factors digit x colour) to {path}", markup=False)
        return

    if name == "polydigits-captions":  # two image modalities and one caption modality, always
        from cmvae_engine.cmvae.data.polydigits_captions import synth_polydigits_captions

        with Board(_console()) as board, board.phase(f"synthesising {name} into {out}") as bar:
            path = synth_polydigits_captions(out, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed,
                                             progress=bar)
        _console().print(f"wrote {name} (2 images + 1 caption modality) to {path}", markup=False)
        return

    with Board(_console()) as board, board.phase(f"synthesising {name} into {out}") as bar:
        path = synth_polydigits(
            out, n_modalities=modalities, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed,
            progress=bar,
        )
    _console().print(f"wrote {name} ({modalities} modalities) to {path}", markup=False)


@data_app.command("convert")
@_clean_errors
def convert(
    kind: Annotated[str, Arg(help=f"Layout of SRC: {', '.join(CONVERTIBLE)}.")],
    src: Annotated[Path, Arg(help="The unzipped data set (for polymnist: SRC/train/m0/0.5.png exists; for cubicc: "
                                  "SRC/images.pt, captions.pt, labels.pt, *_split.npy and cub.vocab exist).")],
    dst: Annotated[Path, Arg(help="Output folder in our format.")],
    seed: Annotated[int, Opt(help="Seed of the held-out valid split when no index files are present.")] = 0,
) -> None:
    """Convert a raw data set into our format (.npy arrays + manifest)."""
    if kind not in CONVERTIBLE:
        raise DataError(f"unknown layout {kind!r}", fix=f"choose one of: {', '.join(CONVERTIBLE)}")
    check_flags(("--seed", seed, SEED, 0))
    if kind == "cubicc":
        from cmvae_engine.cmvae.data.cubicc import convert_cubicc

        path = convert_cubicc(src, dst)
        _console().print(f"converted {src} to {path}", markup=False)
        return
    path = convert_polymnist(src, dst, seed=seed)
    _console().print(f"converted {src} to {path}", markup=False)


@data_app.command("info")
@_clean_errors
def info(
    dataset: Annotated[str, Arg(help="`polydigits`, `polymnist` or a data folder.")],
    data_root: DataRootOpt = None,
) -> None:
    """Show splits, sizes, modalities, image shape and label counts."""
    data = read_dataset(resolve_dataset(dataset, data_root=data_root), mmap=True)
    console = _console()
    console.print(f"{data.name}  ({data.root})", markup=False)
    console.print(f"modalities ({data.n_modalities}): {', '.join(data.modality_names)}", markup=False)
    table = Table("split", "N", "image shape (C, H, W)", "label counts")
    for split_name, split in data.splits.items():
        table.add_row(split_name, str(split.n), _shapes(split), _label_counts(split, data.label_names))
    console.print(table)


@data_app.command("grid")
@_clean_errors
def grid(
    dataset: Annotated[str, Arg(help="`polydigits`, `polymnist` or a data folder.")],
    out: Annotated[Path, Opt(help="PNG file to write.")],
    n: Annotated[int, Opt(help="Number of tuples (rows).")] = 8,
    split: Annotated[str, Opt(help="Split to show.")] = "train",
    scale: Annotated[int, Opt(help="Integer upscaling, so 28x28 images are visible.")] = 3,
    data_root: DataRootOpt = None,
) -> None:
    """Write a PNG of the first N tuples: one row per tuple, one column per modality."""
    check_flags(("--n", n, COUNT, 8), ("--scale", scale, Rule(int, low=1, high=64), 3),
                ("--split", split, Rule(SPLITS), "train"))
    data = read_dataset(resolve_dataset(dataset, data_root=data_root), mmap=True)
    picture = tuple_grid(data.split(split), n)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    _console().print(
        f"wrote {out} ({min(n, data.split(split).n)} tuples x {data.n_modalities} modalities)", markup=False
    )


def tuple_grid(split: MultimodalSplit, n: int, pad: int = 2) -> Image.Image:
    """RGB picture of the first ``n`` tuples, rows tuples and columns modalities, on a white grid."""
    n = max(1, min(n, split.n))
    split = MultimodalSplit([m for m in split.modalities if m.ndim == 4], split.labels)  # captions are not pictures
    shapes = split.image_shapes
    h, w = max(s[1] for s in shapes), max(s[2] for s in shapes)
    canvas = np.full((pad + n * (h + pad), pad + len(shapes) * (w + pad), 3), 255, dtype=np.uint8)
    for k, images in enumerate(split.modalities):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + k * (w + pad)
            rgb = _to_rgb(np.asarray(images[i]))
            canvas[y : y + rgb.shape[0], x : x + rgb.shape[1]] = rgb
    return Image.fromarray(canvas)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """C x H x W uint8 -> H x W x 3: grey repeated, a missing third channel black, extra channels dropped."""
    hwc = image.transpose(1, 2, 0)
    if hwc.shape[2] == 1:
        return np.repeat(hwc, 3, axis=2)
    if hwc.shape[2] == 2:
        return np.pad(hwc, ((0, 0), (0, 0), (0, 1)))
    return hwc[:, :, :3]


def _shapes(split: MultimodalSplit) -> str:
    shapes = split.image_shapes
    return str(shapes[0]) if len(set(shapes)) == 1 else ", ".join(map(str, shapes))


def _label_counts(split: MultimodalSplit, label_names: list[str] | None) -> str:
    if split.labels is None:
        return "unlabelled"
    if split.labels.ndim == 2:  # several factors: the counts of each column
        return "; ".join(f"f{j}: " + _label_counts(MultimodalSplit(split.modalities, split.labels[:, j]),
                                                    label_names if j == 0 else None)
                         for j in range(split.labels.shape[1]))
    classes, counts = np.unique(split.labels, return_counts=True)
    names = [label_names[c] if label_names and c < len(label_names) else str(c) for c in classes]
    return " ".join(f"{name}:{count}" for name, count in zip(names, counts, strict=True))
