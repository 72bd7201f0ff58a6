"""HuggingFace safetensors directories in and out, streaming one tensor at a time.

Export writes ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``) when the
tensors do not fit in one shard.  Shards are planned from the index alone, then each
file is written tensor by tensor, so memory holds one tensor at a time.  Import reads
an HF directory (single or sharded) tensor by tensor into a stashpoint checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch

from stashpoint.convert.experts import ExpertSplit, sliced_stream, split_rows
from stashpoint.convert.extra_files import ExtraFile, copy_extra_files, resolve_extra_files
from stashpoint.convert.stream import ConvertSummary, copy_to_stashpoint, peak_rss_bytes
from stashpoint.engine.hf_shards import DEFAULT_SHARD_BYTES, ShardRow, write_hf_files
from stashpoint.engine.load import iter_full, load_state
from stashpoint.engine.publish import staged_directory
from stashpoint.engine.reader import read_index
from stashpoint.errors import InvalidStateError, MissingKeyError
from stashpoint.foreign.hf import hf_config
from stashpoint.format.dtypes import dtype_from_name
from stashpoint.format.index import Index, TensorRecord
from stashpoint.format.index_json import parse_strict
from stashpoint.storage import resolve

NameMap = Callable[[str], str | None] | Mapping[str, str] | None


def strip_prefix(prefix: str) -> Callable[[str], str | None]:
    """A name map keeping only names under ``prefix`` and dropping the prefix (e.g. ``model.``)."""

    def mapping(name: str) -> str | None:
        return name[len(prefix) :] if name.startswith(prefix) else None

    return mapping


def _mapper(name_map: NameMap) -> Callable[[str], str | None]:
    if name_map is None:
        return strip_prefix("model.")
    if callable(name_map):
        return name_map
    table = dict(name_map)
    return lambda name: table.get(name)


def _select(index: Index, mapper: Callable[[str], str | None], src) -> tuple[list[tuple], list[str]]:
    """``(name, hf_name, record)`` of each tensor the name map keeps, and the names left out."""
    chosen, skipped, seen = [], [], {}
    for name, item in sorted(index.items.items()):
        hf_name = mapper(name)
        if hf_name is None or not isinstance(item, TensorRecord):
            skipped.append(name)
            continue
        if hf_name in seen:
            raise InvalidStateError(f"name map sends both {seen[hf_name]!r} and {name!r} to {hf_name!r}")
        seen[hf_name] = name
        chosen.append((name, hf_name, item))
    return chosen, skipped


def export_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    name_map: NameMap = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    copy_files: tuple[str | os.PathLike, ...] = (),
    copy_from: str | os.PathLike | None = None,
    verify: bool = True,
    progress: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
    experts: tuple[ExpertSplit, ...] = (),
) -> ConvertSummary:
    """Write the tensors of a stashpoint checkpoint as an HF safetensors directory.

    ``name_map`` turns checkpoint names into HF names (a function returning None to
    skip a tensor, or a dict); the default keeps ``model.*`` and strips the prefix, so
    optimizer state is left out.  ``dtype`` casts floating-point tensors; integer and
    bool tensors are copied as they are.  ``copy_files`` (e.g. ``config.json``) are
    copied into ``dst``; relative names are found in the source checkpoint, or in
    ``copy_from`` if given, and all of them before anything is written (a missing one
    raises :class:`~stashpoint.errors.DataFileMissingError`).  The directory is written
    beside ``dst`` and swapped in at once
    (:func:`~stashpoint.engine.publish.staged_directory`): an existing ``dst`` is refused
    without ``overwrite`` and, with it, replaced whole, never mixed with new shards.
    ``experts`` split grouped expert tensors (``[num_experts, ...]``) into HF's per-expert
    tensors (:class:`~stashpoint.convert.experts.ExpertSplit`; names after ``name_map``).
    """
    t0 = time.perf_counter()
    index = read_index(*resolve(os.fspath(src)))
    extras = resolve_extra_files(src, copy_files, copy_from)
    chosen, skipped = _select(index, _mapper(name_map), src)
    tied = _tied_copies(chosen, extras)
    skipped += [name for name, hf, _ in chosen if hf in tied]
    chosen = [row for row in chosen if row[1] not in tied]
    if not chosen:
        raise MissingKeyError(f"{src}: no tensor is selected by the name map")

    def out_dtype(rec: TensorRecord) -> torch.dtype:
        t = dtype_from_name(rec.dtype)
        return dtype if dtype is not None and t.is_floating_point else t

    rows = [ShardRow(hf_name=hf, source=n, shape=r.shape, dtype=out_dtype(r)) for n, hf, r in chosen]
    stream = sliced_stream(lambda keys: iter_full(os.fspath(src), keys, verify=verify), rows, experts)
    rows = split_rows(rows, experts)
    with staged_directory(dst, overwrite=overwrite) as staging:
        total, n_files = write_hf_files(
            staging, rows, lambda keys: _reported(stream(keys), progress), max_shard_bytes
        )
        copy_extra_files(extras, staging)
    return ConvertSummary(
        tensors=len(chosen),
        bytes=total,
        files=n_files,
        seconds=time.perf_counter() - t0,
        skipped=tuple(skipped),
        values=0,
        peak_rss_bytes=peak_rss_bytes(),
    )


def _tied_copies(chosen: list[tuple], extras: tuple[ExtraFile, ...]) -> set[str]:
    """HF names of output embeddings stored as a copy of another tensor, when the model ties them.

    transformers writes a tied weight once (``lm_head.weight`` is left out when
    ``tie_word_embeddings`` is set) and ties it again on load; so do we, when a
    ``config.json`` among the copied files says the embeddings are tied and the
    checkpoint's checksums show the output embedding equal to another tensor.
    """
    configs = [f for f in extras if f.name == "config.json"]
    if not configs:
        return set()
    cfg = configs[0]
    config = parse_strict(cfg.storage.read_bytes(cfg.path), cfg.storage.describe(cfg.path))
    if not isinstance(config, dict) or not config.get("tie_word_embeddings", False):
        return set()

    def content(rec) -> tuple:
        return (rec.dtype, tuple(rec.shape), tuple(c.crc32c for c in rec.chunks))

    by_content: dict[tuple, list[str]] = {}
    for _name, hf, rec in chosen:
        if rec.chunks and all(c.crc32c for c in rec.chunks):
            by_content.setdefault(content(rec), []).append(hf)
    out = set()
    for names in by_content.values():
        heads = [n for n in names if n.split(".")[-2:] == ["lm_head", "weight"]]
        if heads and len(heads) < len(names):
            out.update(heads)
    return out


def _reported(items, progress):
    for name, tensor in items:
        if progress is not None:
            progress(name, tensor.numel() * tensor.element_size())
        yield name, tensor


def import_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prefix: str = "model.",
    overwrite: bool = False,
    progress=None,
    experts: tuple[ExpertSplit, ...] = (),
) -> ConvertSummary:
    """Turn an HF safetensors directory into a stashpoint checkpoint, tensor by tensor.

    Names gain ``prefix`` so the result loads into ``{"model": module}``.  ``experts``
    stack HF's per-expert tensors back into grouped ones (the rules given to
    :func:`export_hf`); every expert from 0 to the highest must be there.
    """
    return copy_to_stashpoint(
        src,
        dst,
        source="huggingface",
        rename=lambda n: prefix + n,
        overwrite=overwrite,
        progress=progress,
        experts=experts,
    )


def load_hf(
    module: torch.nn.Module,
    path: str | os.PathLike,
    *,
    name_map: Callable[[str], str | None] | Mapping[str, str] | None = None,
    strict: bool = True,
    process_group=None,
    timeout_s: float = 600.0,
    follow_symlinks: bool = False,
):
    """Load an HF safetensors directory straight into ``module``, in whatever layout it has.

    A collective when ``module`` is sharded (FSDP2, TP): every rank calls it and reads
    only the byte ranges of the safetensors files its shards cover.  HF names are taken
    as ``module``'s parameter and buffer names unless ``name_map`` maps them (a function
    or a table; None from a function, or a name missing from a table, leaves a tensor
    out).  Tied weights stored once (``save_pretrained`` with ``tie_word_embeddings``)
    fill every name of the tie: ties are found in ``module`` itself and, for transformers
    models, in the directory's ``config.json``.  Returns the :class:`~stashpoint.LoadResult`.
    """
    if name_map is None:
        mapped: Callable[[str], str | None] = lambda n: n
    elif callable(name_map):
        mapped = name_map
    else:
        table = dict(name_map)
        mapped = table.get

    def rename(name: str) -> str | None:
        new = mapped(name)
        return None if new is None else "model." + new

    return load_state(
        {"model": module},
        os.fspath(path),
        strict=strict,
        process_group=process_group,
        timeout_s=timeout_s,
        rename=rename,
        tied=_config_ties(module, os.fspath(path), follow_symlinks),
        follow_symlinks=follow_symlinks,
    )


def _config_ties(module: torch.nn.Module, path: str, follow_symlinks: bool) -> tuple[tuple[str, ...], ...]:
    """The output embedding tied to the input embedding, when ``config.json`` says so."""
    get_in = getattr(module, "get_input_embeddings", None)
    get_out = getattr(module, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return ()
    if not hf_config(*resolve(path), follow_symlinks=follow_symlinks).get("tie_word_embeddings", False):
        return ()
    emb_in, emb_out = get_in(), get_out()
    names = {id(m): n for n, m in module.named_modules()}
    if emb_in is None or emb_out is None or id(emb_in) not in names or id(emb_out) not in names:
        return ()
    return ((f"model.{names[id(emb_in)]}.weight", f"model.{names[id(emb_out)]}.weight"),)
