"""Streaming delimited input: files of any size in flat memory, parsed a block at a time.

:class:`DelimitedStream` reads one or more CSV/TSV files (Criteo, Avazu or any
:class:`~damo_hybrid.data.schema.Schema`; ``.gz`` decompressed on the fly) in blocks of about
``block_mb`` cut at line ends, in a thread of its own. Each block goes to the first of three
judges that takes it whole:

1. the compiled fast path (:mod:`~damo_hybrid.data.textparse`): labels, dense values and keys
   in one pass over the bytes, lines split over threads, for lines of plain numbers and ASCII ids;
2. pyarrow's multi-threaded CSV parser with the schema's column types (when pyarrow is
   installed), its string columns hashed straight from Arrow's packed bytes
   (:func:`~damo_hybrid.keys.hashing.hash_packed`);
3. the reference line reader.

All three give the same keys, dense features and labels. Batches are cut across block and file
boundaries, so memory holds a few blocks and one batch, whatever the file size.

A block that the first two refuse, or whose values the schema rejects (a wrong column count, a
label that is not 0/1, a dense value that is not a number ...), is parsed line by line by the
reference reader (:func:`~damo_hybrid.data.delimited.delimited_lines`), so errors name the same
file and line as :func:`~damo_hybrid.data.readers.read_dataset`, and ``on_error="skip"`` drops
the same lines.

Every batch comes with the :class:`Position` of the row after it (file, byte offset of its block,
line number there, rows of the block already used): :meth:`DelimitedStream.batches` resumes from
one exactly, seeking in a plain file (a gzip file is decompressed again up to the offset).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..keys.hashing import hash_feature, hash_packed
from .blocks import Block, Holdout, Position, finish_block, strip_header, to_batch
from .delimited import delimited_lines
from .files import ahead, byte_part, check_not_gzip, expand_paths, not_text, skip_bytes, unreadable
from .schema import DenseMode, Schema
from .synthetic import Batch

__all__ = ["DelimitedStream", "Position", "Holdout", "expand_paths"]



class DelimitedStream:
    """Batches of one or more delimited files, read in blocks.

    Args:
        paths: a file, glob, directory, or a list of them (read in that order).
        schema: the files' columns (all files share it).
        batch_size: samples per batch; the stream's last batch may be smaller.
        block_mb: bytes read and parsed at a time (the memory the reader holds, about 3x this).
        holdout: read only one side of a held-out split (see :class:`Holdout`).
        shuffle_buffer: shuffle rows within consecutive windows of this many rows, each by a
            permutation drawn from ``(seed, window number)``: reproducible, and resumable from a
            :class:`Position` (0: file order).
        compiled: try the compiled fast path first (False: pyarrow first; the same batches, for
            comparisons).
        part: ``(rank, world)``: read only this rank's part of the input (a run that splits its
            input over ranks, :mod:`damo_hybrid.dist.data`): files ``rank, rank + world, ...``
            of an input of at least ``world`` files, else its ``1 / world`` of the files' bytes
            read as one run, cut at line starts (plain text only).
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], schema: Schema,
                 batch_size: int = 4096, block_mb: float = 8.0, holdout: Holdout | None = None,
                 shuffle_buffer: int = 0, seed: int = 0, compiled: bool = True,
                 part: tuple[int, int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not block_mb > 0:
            raise ValueError(f"block_mb must be > 0, got {block_mb}")
        self.paths = expand_paths(paths)
        # each file's number in the whole input, which the held-out split hashes, and the bytes
        # [first, end) of it this stream reads (end None: to the end of the file)
        self.file_ids = list(range(len(self.paths)))
        self.ranges: list[tuple[int, int | None]] = [(0, None)] * len(self.paths)
        if part is not None:
            self._take_part(*part)
        self.schema = schema
        self.batch_size = batch_size
        self.block_bytes = max(1 << 12, int(block_mb * 2**20))
        self.holdout = holdout
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.skipped = 0
        self._bases: dict[int, int] = {}
        s = schema
        self.dense_fields = list(s.dense) if s.dense_mode in (DenseMode.LOG1P, DenseMode.BOTH) else []
        self.sparse_fields = list(s.sparse) + (list(s.dense) if s.dense_mode in (DenseMode.BUCKETIZE, DenseMode.BOTH) else [])
        self._convert = self._arrow_options()
        from .textparse import plan_text

        self._plan = plan_text(schema) if compiled else None

    def _take_part(self, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {(rank, world)}")
        if len(self.paths) >= world:  # by file
            self.paths, self.file_ids = self.paths[rank::world], self.file_ids[rank::world]
            self.ranges = self.ranges[rank::world]
            return
        if not self.splits_by_bytes:
            raise ValueError(f"{len(self.paths)} {type(self).__name__} file(s) cannot be split over {world} ranks: "
                             f"give at least {world} files (a glob or a directory)")
        pieces = byte_part(self.paths, rank, world)
        if not pieces:
            raise ValueError(f"the input ({self.paths[0]}{f' and {len(self.paths) - 1} more' if len(self.paths) > 1 else ''}) "
                             f"has too few lines to give each of "
                             f"{world} ranks some: use fewer ranks or more data")
        self.paths = [self.paths[i] for i, _, _ in pieces]
        self.file_ids = [self.file_ids[i] for i, _, _ in pieces]
        self.ranges = [(a, b) for _, a, b in pieces]

    splits_by_bytes = True  # a file can be cut at any line start (see part)

    def holds_rows(self) -> bool:
        """Whether the stream yields at least one row (after its held-out split and malformed lines
        skipped): read up to its first block that has one. A run checks this before any work, so that
        an empty input is an error rather than a run of 0 steps. Raises what reading it raises."""
        skipped = self.skipped
        blocks = self._blocks(Position())
        try:
            found = any(len(block) for block, _ in blocks)
        finally:
            blocks.close()  # type: ignore[attr-defined]
        if found:  # (else ``skipped`` tells how many malformed lines it dropped)
            self.skipped = skipped  # the lines it skipped are counted again when the run reads them
        return found

    # ------------------------------------------------------------ batches
    def batches(self, start: Position = Position()) -> Iterator[tuple[Batch, Position]]:
        """Every batch from ``start`` to the end of the last file, each with the position after it."""
        parts: list[Block] = []
        have = 0
        for block, pos_after_rows in (self._windows(start) if self.shuffle_buffer else self._blocks(start)):
            used = 0
            while have + len(block) - used >= self.batch_size:
                take = self.batch_size - have
                parts.append(block.take(slice(used, used + take)))
                used += take
                yield to_batch(parts), pos_after_rows(used)
                parts, have = [], 0
            if used < len(block):
                parts.append(block.take(slice(used, None)))
                have += len(block) - used
        if have:
            yield to_batch(parts), Position(len(self.paths), 0, 1, 0)

    def _windows(self, start: Position) -> Iterator[tuple[Block, object]]:
        """Shuffled windows of ``shuffle_buffer`` rows, with ``rows used -> Position after them``
        (the window's start, its number and the rows of it used)."""
        n = self.shuffle_buffer
        w, skip = start.window, start.taken
        w_pos = replace(start, window=0, taken=0)
        blocks = self._blocks(w_pos)
        carry: tuple[Block, Any, int] | None = None
        while True:
            parts: list[Block] = []
            have, last = 0, None
            while have < n:
                if carry is not None:
                    block, after, used = carry
                    carry = None
                else:
                    nxt = next(blocks, None)
                    if nxt is None:
                        break
                    (block, after), used = nxt, 0
                take = min(n - have, len(block) - used)
                parts.append(block.take(slice(used, used + take)))
                have, used = have + take, used + take
                last = (after, used)
                if used < len(block):
                    carry = (block, after, used)
            if not have:
                return
            assert last is not None
            window = Block.concat(parts).take(np.random.default_rng([self.seed, w]).permutation(have))
            nxt_pos = replace(last[0](last[1]), window=w + 1, taken=0)
            base, skip = skip, 0
            if base:
                window = window.take(slice(base, None))

            def at(used: int, w: int = w, w_pos: Position = w_pos, base: int = base, n_rows: int = have,
                   nxt_pos: Position = nxt_pos) -> Position:
                return nxt_pos if used + base >= n_rows else replace(w_pos, window=w, taken=used + base)
            yield window, at
            w, w_pos = w + 1, replace(nxt_pos, window=0, taken=0)

    def _blocks(self, start: Position) -> Iterator[tuple[Block, object]]:
        """``(block, rows used -> Position after them)`` from ``start`` on. A thread reads and
        parses (pyarrow, without the GIL) the next blocks while this one is converted."""
        rows = 0
        if start.file < len(self.paths) and start.offset < self.ranges[start.file][0]:  # the top of a part
            start = replace(start, offset=self.ranges[start.file][0], line=1, row=0, rows=0)
        for fi, off, ln, raw, nlines, table in ahead(self._tables(start), depth=2):
            block = self._convert_table(fi, raw, ln, off == 0, table, off)
            block, skip, first, rows = self._frame(start, fi, off, block, rows)

            def after(used: int, fi: int = fi, off: int = off, ln: int = ln, n: int = len(block) + skip,
                      base: int = skip, raw_len: int = len(raw), nl: int = nlines, first: int = first,
                      rows: int = rows) -> Position:
                if used + base >= n:  # the block is used up: the next one starts after it
                    return Position(fi, off + raw_len, ln + nl, 0, rows)
                return Position(fi, off, ln, used + base, first)
            yield block, after

    def _frame(self, start: Position, fi: int, off: int, block: Block, rows: int) -> tuple[Block, int, int, int]:
        """A block at ``(file, offset)`` with the held-out split and the resume skip applied.

        Args:
            rows: rows of the file before the block (its first row's ordinal, for the split);
                restarts at each file's first block (``offset`` 0) and at ``start``.
        Returns:
            ``(block, rows skipped, its first row's ordinal, rows of the file after it)``.
        """
        at_start = (fi, off) == (start.file, start.offset)
        top = self.ranges[fi][0]
        if at_start or off == top:
            rows = start.rows if at_start else 0
        first, rows = rows, rows + len(block)
        if self.holdout is not None:
            block = block.take(self.holdout.keep(self.file_ids[fi], first, len(block), top))
        skip = start.row if at_start else 0
        if skip:
            block = block.take(slice(skip, None))
        return block, skip, first, rows

    def _tables(self, start: Position) -> Iterator[tuple[int, int, int, bytes, int, object]]:
        """``(file, offset, line, raw bytes, newlines, parsed)`` of each block: parsed is a
        :class:`Block` from the compiled fast path, else an Arrow table, else None."""
        for fi in range(start.file, len(self.paths)):
            top, end = self.ranges[fi]
            offset, line = (start.offset, start.line) if fi == start.file else (top, 1)
            # reading (and gunzip) runs a thread of its own, a block ahead of the parse
            for off, ln, raw, nlines in ahead(self._raw_blocks(self.paths[fi], offset, line, end), 2, "damo-read"):
                body = strip_header(raw, self.schema, off == 0)
                block = self._text(body)
                yield fi, off, ln, raw, nlines, block if block is not None else self._arrow(body)

    def _raw_blocks(self, path: Path, offset: int, line: int,
                    end: int | None = None) -> Iterator[tuple[int, int, bytes, int]]:
        """``(byte offset, first line number, bytes ending at a line end, newlines in them)``,
        up to byte ``end`` (a line start; None: the end of the file). Line numbers count from the
        part's first line, which :meth:`_line_base` places in the file."""
        gz = path.suffix == ".gz"
        if not gz and offset == 0:
            check_not_gzip(path)
        opener = gzip.open if gz else open
        try:
            with opener(path, "rb") as f:
                if offset:
                    if path.suffix == ".gz":
                        skip_bytes(f, offset)
                    else:
                        f.seek(offset)
                rest = b""
                left = -1 if end is None else end - offset  # bytes still to read (-1: all)
                while True:
                    chunk = f.read(self.block_bytes if left < 0 else min(self.block_bytes, left))
                    if left >= 0:
                        left -= len(chunk)
                    if not chunk:
                        if rest:
                            yield offset, line, rest, rest.count(b"\n")
                        return
                    buf = rest + chunk
                    cut = buf.rfind(b"\n") + 1
                    if cut == 0:  # one line longer than a block: read on
                        rest = buf
                        continue
                    raw, rest = buf[:cut], buf[cut:]
                    n = raw.count(b"\n")
                    yield offset, line, raw, n
                    offset += len(raw)
                    line += n
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(unreadable(path, line, e)) from e  # (a .gz is never cut into parts: line is the file's)

    # ------------------------------------------------------------ parsing
    def _arrow_options(self) -> tuple[object, object, object] | None:
        """pyarrow's options for the schema, or None without pyarrow (the compiled path then hands
        a block it cannot judge straight to the line reader)."""
        try:
            import pyarrow as pa
            import pyarrow.csv as pacsv
        except ImportError:
            return None

        s = self.schema
        types = {s.label: pa.float64(), **{c: pa.float64() for c in s.dense},
                 **{c: (pa.int64() if c in s.int_sparse else pa.string()) for c in s.sparse}}
        read = pacsv.ReadOptions(column_names=list(s.columns), use_threads=True, block_size=1 << 22)
        parse = pacsv.ParseOptions(delimiter=s.sep, quote_char=False, double_quote=False, escape_char=False,
                                   newlines_in_values=False, ignore_empty_lines=True)
        convert = pacsv.ConvertOptions(column_types=types, include_columns=[s.label, *s.dense, *s.sparse],
                                       null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False)
        return read, parse, convert

    def _line_base(self, fi: int) -> int:
        """Lines of file ``fi`` before this stream's part of it (counted once, when a line number
        is first needed: the fast paths never read the bytes before the part)."""
        top = self.ranges[fi][0]
        if not top:
            return 0
        got = self._bases.get(fi)
        if got is None:
            got = 0
            with open(self.paths[fi], "rb") as f:
                left = top
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    got += chunk.count(b"\n")
                    left -= len(chunk)
            self._bases[fi] = got
        return got

    def _convert_table(self, fi: int, raw: bytes, line: int, file_start: bool, table: object,
                       offset: int = 0) -> Block:
        path = self.paths[fi]
        block = table if isinstance(table, Block) else self._fast(table) if table is not None else None
        if block is None:  # a value the fast path will not judge: the reference line reader decides
            line += self._line_base(fi)
            try:
                text = raw.decode("utf-8-sig" if file_start else "utf-8")
            except UnicodeDecodeError as e:  # its message would quote the whole block
                raise ValueError(not_text(path, line + raw.count(b"\n", 0, e.start), offset + e.start,
                                          path.suffix == ".gz")) from e
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            data = self._line_reader(path, ((line + i, ln.rstrip("\r")) for i, ln in enumerate(lines)))
            self.skipped += data.skipped
            return Block(data.sparse, data.dense, data.label)
        return block

    def _line_reader(self, path: Path, lines: Iterator[tuple[int, str]]) -> Any:
        """The reference reader of a block's ``(line number, line)`` pairs (the fallback)."""
        return delimited_lines(path, lines, self.batch_size, self.schema, allow_empty=True)

    def _arrow(self, body: bytes) -> object:
        """The block parsed by pyarrow with the schema's types, or None where it refuses it."""
        if self._convert is None:
            return None
        import pyarrow as pa
        import pyarrow.csv as pacsv

        if not body.strip():
            return pa.table({})
        read, parse, convert = self._convert  # type: ignore[misc]
        try:
            return pacsv.read_csv(io.BytesIO(body), read_options=read, parse_options=parse, convert_options=convert)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
            return None

    def _fast(self, t: object, schema: Schema | None = None) -> Block | None:
        """A parsed block's keys, dense features and labels, or None if any row needs the line
        reader's judgement (``schema``: the stream's, or one naming other int id columns)."""
        s = schema or self.schema
        if not t.num_columns:  # type: ignore[attr-defined]
            return Block({f: np.zeros(0, np.uint64) for f in self.sparse_fields},
                          np.zeros((0, len(self.dense_fields)), np.float32), np.zeros(0, np.float32))
        label = _floats(t.column(s.label))
        if label is None or not np.isfinite(label).all():
            return None
        dense = np.zeros((t.num_rows, len(s.dense)), np.float64)  # type: ignore[attr-defined]
        for j, c in enumerate(s.dense):
            col = t.column(c)
            v = _floats(col, missing=np.nan)
            # a "nan" or "inf" text is a bad value, not a missing one: the line reader names it
            if v is None or (~np.isfinite(v) & ~_nulls(col)).any():
                return None
            dense[:, j] = v
        sparse: dict[str, np.ndarray] = {}
        for c in s.sparse:
            col = t.column(c).combine_chunks()
            if c in s.int_sparse:
                if col.null_count:
                    return None
                sparse[c] = hash_feature(c, col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
            else:
                sparse[c] = _hash_strings(c, col)
        return finish_block(s, label, dense, sparse)

    def _text(self, body: bytes) -> Block | None:
        """The block parsed by the compiled fast path, or None where it hands the block on."""
        if self._plan is None:
            return None
        from .textparse import parse_text

        parsed = parse_text(body, self._plan)
        if parsed is None:
            return None
        return finish_block(self.schema, parsed.label, parsed.dense, dict(zip(self.schema.sparse, parsed.keys)))


def _floats(col: object, missing: float | None = None) -> np.ndarray | None:
    """float64 of an Arrow column; nulls (empty values) are ``missing``, or refused (None)."""
    c = col.combine_chunks()  # type: ignore[attr-defined]
    if c.null_count and missing is None:
        return None
    return c.to_numpy(zero_copy_only=False) if not c.null_count else c.fill_null(missing).to_numpy()


def _nulls(col: object) -> np.ndarray:
    c = col.combine_chunks()  # type: ignore[attr-defined]
    return c.is_null().to_numpy(zero_copy_only=False)


def _hash_strings(field: str, col: object) -> np.ndarray:
    """Keys of an Arrow string column straight from its offsets and bytes."""
    import pyarrow as pa

    c = col if isinstance(col, pa.Array) else col.combine_chunks()  # type: ignore[attr-defined]
    if pa.types.is_large_string(c.type):
        dtype = np.int64
    else:
        dtype = np.int32
    _, offs, data = c.buffers()
    offsets = np.frombuffer(offs, dtype=dtype)[c.offset:c.offset + len(c) + 1]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return hash_packed(field, raw, offsets)
