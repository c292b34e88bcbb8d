"""The streamed tier: images kept encoded (their JPEG/PNG bytes) in an Arrow IPC file, memory-mapped, read at
random by index and decoded per batch by background workers.

Arrow is the format Hugging Face `datasets` keeps its tables in, read here with pyarrow directly: a memory map
(the operating system pages bytes in and out, so a dataset far larger than memory needs no more than the pages
a batch touches), record batches of ROWS rows, so row i is batch i // ROWS, row i % ROWS: a zero-copy slice.
Columns: bytes (decode.prepare's: the file, or its reduced image as a JPEG), label, width and height (of those
bytes), digest (of the source file: what the fingerprint hashes), name (the source file, for messages); the class
names, the row count and the format in the schema's metadata, so a run over an indexed source neither lists nor
reads it again, and a file cut short or of an older format is known on open. One file per split and store size,
written like every kdfast file: one writer (the caller holds the lock), a temporary name, an atomic rename.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..files import atomic_write
from .decode import decode_image, decode_pil, digest, prepare, stored_size
from .sources import Listing
from .types import DataError

PREPARE_THREADS = os.cpu_count() or 1
ROWS = 64  # rows per record batch: what a write holds in memory (64 ImageNet JPEGs are about 7 MB)
FORMAT = "3"  # 3: the name column, and the row count in the schema's metadata
COLUMNS = ("bytes", "label", "width", "height", "digest", "name")


class StaleStore(DataError):
    """A prepared Arrow file that is damaged, cut short, gone or of an older format."""


def write_encoded(listing: Listing, split: str, path: str, store_size: int, progress=None) -> None:
    """A split's files as kept at the store size in an Arrow IPC file. Each image is decoded once here
    (decode.prepare), so a damaged one is named before training, as the device tier names it."""
    import pyarrow as pa

    entries = listing.splits[split]
    schema = pa.schema([("bytes", pa.large_binary()), ("label", pa.int64()), ("width", pa.int32()),
                        ("height", pa.int32()), ("digest", pa.binary(16)), ("name", pa.large_string())],
                       metadata={"classes": json.dumps(listing.classes), "rows": str(len(entries)), "format": FORMAT})
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def row(entry):
        label, name, key = entry
        data = listing.read(key)
        kept, (w, h) = prepare(data, name, store_size)
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # for messages: text
        return kept, label, w, h, digest(data), shown  # the digest of the source file

    def write(tmp):
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer, \
                ThreadPoolExecutor(PREPARE_THREADS) as pool:  # Pillow releases the GIL while it decodes and encodes
            for start in range(0, len(entries), ROWS):
                cols = {k: [] for k in COLUMNS}
                for values in pool.map(row, entries[start:start + ROWS]):
                    for k, v in zip(cols, values):
                        cols[k].append(v)
                memory = pa.system_memory_pool()  # malloc: freed batches go back to the system, not to an arena
                arrays = [pa.array(cols[k], type=schema.field(k).type, memory_pool=memory) for k in cols]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                if progress is not None:
                    progress.update(len(cols["label"]))

    atomic_write(path, write)


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class EncodedStore:
    """Random access to an Arrow file of encoded images; opened lazily in each process (workers open their own)."""

    def __init__(self, path: str):
        self.path = path
        self._reader = None
        self._pid = None

    def __getstate__(self):  # a worker process gets the path, not the parent's memory map
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def reader(self):
        import pyarrow as pa

        if self._reader is None or self._pid != os.getpid():
            try:
                reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
            except FileNotFoundError:
                raise StaleStore(f"{self.path}: the streamed copy of the dataset is gone (deleted while in use?). "
                                 "Run again: it is written anew.") from None
            except (OSError, pa.ArrowException) as e:
                raise StaleStore(f"{self.path}: the streamed copy of the dataset is damaged ({_first(e)}). Delete "
                                 "it; the next run writes it again.") from None
            self._reader, self._pid = reader, os.getpid()
        return self._reader

    def validate(self) -> None:
        """Refuse (StaleStore) a file of another format or whose rows are not all there: the footer, the columns and
        the row count checked against the writer's plan (no image bytes read)."""
        schema = self.reader.schema
        meta = schema.metadata or {}
        if meta.get(b"format") != FORMAT.encode() or tuple(schema.names) != COLUMNS:
            raise StaleStore(f"{self.path}: a streamed copy in an older format.")
        rows = sum(self.reader.get_batch(b).num_rows for b in range(self.reader.num_record_batches))
        if str(rows).encode() != meta.get(b"rows"):
            raise StaleStore(f"{self.path}: the streamed copy holds {rows:,} rows of "
                             f"{meta.get(b'rows', b'?').decode()} (damaged).")

    @property
    def classes(self) -> list[str]:
        return json.loads(self.reader.schema.metadata[b"classes"])

    def column(self, name: str) -> list:
        return [v for b in range(self.reader.num_record_batches)
                for v in self.reader.get_batch(b).column(name).to_pylist()]

    def cell(self, row: int, column: str = "bytes"):
        try:
            return self.reader.get_batch(row // ROWS).column(column)[row % ROWS].as_py()
        except (OSError, IndexError, KeyError, ValueError) as e:
            raise StaleStore(f"{self.path}: row {row} cannot be read ({_first(e)}): the streamed copy is damaged. "
                             "Delete it; the next run writes it again.") from None

    def read(self, row: int) -> bytes:
        return self.cell(row)


class StreamedSplit:
    """A split whose images stay encoded: labels, stored sizes and digests in memory, bytes in the EncodedStore."""

    def __init__(self, store: EncodedStore, rows: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
                 digests: list[bytes], store_size: int):
        self.store, self.rows, self.labels, self.sizes = store, rows, labels, sizes
        self.digests, self.store_size = digests, store_size
        self.decoded = 0  # images this process decoded (counted where decoding runs in this process)

    @classmethod
    def open(cls, path: str, store_size: int) -> "StreamedSplit":
        """The split of a prepared file; StaleStore when it is damaged, cut short or of an older format."""
        store = EncodedStore(path)
        store.validate()
        labels = torch.tensor(store.column("label"), dtype=torch.int64)
        widths, heights = store.column("width"), store.column("height")
        sizes = torch.tensor([stored_size(w, h, store_size)[::-1] for w, h in zip(widths, heights)],
                             dtype=torch.int32).view(-1, 2)
        return cls(store, torch.arange(len(labels)), labels, sizes, store.column("digest"), store_size)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str]:
        return self.store.classes

    @property
    def box(self) -> tuple[int, int]:
        return int(self.sizes[:, 0].max()), int(self.sizes[:, 1].max())

    def subset(self, keep: torch.Tensor) -> "StreamedSplit":
        return StreamedSplit(self.store, self.rows[keep], self.labels[keep], self.sizes[keep],
                             [self.digests[i] for i in keep.tolist()], self.store_size)

    def _decoded(self, row: int, decoder):
        """decoder(bytes, name, store size) of a row. Every image decoded when the file was written, so a failure
        here is a damaged copy: named with the user's file it was made from."""
        try:
            return decoder(self.store.read(row), "", self.store_size)
        except DataError as e:
            if isinstance(e, StaleStore):
                raise
            reason = str(e).split("(", 1)[-1].rsplit(")", 1)[0]
            raise StaleStore(f"{self.store.cell(row, 'name')}: its copy in {self.store.path} (row {row}) cannot be "
                             f"decoded ({reason}), though the file decoded when the copy was written: the copy is "
                             "damaged. Delete it; the next run writes it again.") from None

    def decode(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images of samples `indices` (B,) in a box-padded uint8 (B, 3, h, w), and their sizes (B, 2)."""
        sizes = self.sizes[indices]
        out = torch.zeros(len(indices), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), dtype=torch.uint8)
        for k, i in enumerate(indices.tolist()):
            img = self._decoded(int(self.rows[i]), decode_image)
            out[k, :, :img.shape[1], :img.shape[2]] = img
        self.decoded += len(indices)
        return out, sizes

    def decode_pil(self, indices: torch.Tensor) -> list:
        """The stored images of samples `indices` as Pillow images (a worker computing views with Pillow)."""
        images = [self._decoded(int(self.rows[i]), decode_pil) for i in indices.tolist()]
        self.decoded += len(images)
        return images
