"""The streamed tier: images kept encoded (their JPEG/PNG bytes) in an Arrow IPC file, memory-mapped, read at
random by index and decoded per batch by background workers.

Arrow is the format Hugging Face `datasets` keeps its tables in, read here with pyarrow directly: a memory map
(the operating system pages bytes in and out, so a dataset far larger than memory needs no more than the pages
a batch touches), record batches of ROWS rows, so row i is batch i // ROWS, row i % ROWS: a zero-copy slice.
Columns: bytes (decode.prepare's: the file, or its reduced image as a JPEG), label, width and height (of those
bytes), digest (of the source file: what the fingerprint hashes); the class names in the schema's metadata, so a
run over an indexed source neither lists nor reads it again. One file per split and store size.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .decode import decode_image, decode_pil, digest, prepare, stored_size
from .sources import Listing
from .types import DataError

PREPARE_THREADS = os.cpu_count() or 1
ROWS = 64  # rows per record batch: what a write holds in memory (64 ImageNet JPEGs are about 7 MB)


def write_encoded(listing: Listing, split: str, path: str, store_size: int, progress=None) -> None:
    """A split's files as kept at the store size (decode.prepare: the file itself, or its reduced image as a JPEG)
    in an Arrow IPC file, written as .partial and renamed when whole."""
    import pyarrow as pa

    schema = pa.schema([("bytes", pa.large_binary()), ("label", pa.int64()), ("width", pa.int32()),
                        ("height", pa.int32()), ("digest", pa.binary(16))],
                       metadata={"classes": json.dumps(listing.classes)})
    entries = listing.splits[split]
    partial = path + ".partial"
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def row(entry):
        label, name, key = entry
        data = listing.read(key)
        kept, (w, h) = prepare(data, name, store_size)
        return kept, label, w, h, digest(data)  # the digest of the source file

    with pa.OSFile(partial, "wb") as sink, pa.ipc.new_file(sink, schema) as writer, \
            ThreadPoolExecutor(PREPARE_THREADS) as pool:  # Pillow releases the GIL while it decodes and encodes
        for start in range(0, len(entries), ROWS):
            cols = {"bytes": [], "label": [], "width": [], "height": [], "digest": []}
            for values in pool.map(row, entries[start:start + ROWS]):
                for k, v in zip(cols, values):
                    cols[k].append(v)
            memory = pa.system_memory_pool()  # malloc: freed batches go back to the system, not to a retained arena
            arrays = [pa.array(cols[k], type=schema.field(k).type, memory_pool=memory) for k in cols]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            if progress is not None:
                progress.update(len(cols["label"]))
    os.replace(partial, path)


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
                self._reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{self.path}: the streamed copy of the dataset is damaged ({e}). Delete it; the next "
                                "run writes it again.") from None
            self._pid = os.getpid()
        return self._reader

    @property
    def classes(self) -> list[str]:
        return json.loads(self.reader.schema.metadata[b"classes"])

    def column(self, name: str) -> list:
        return [v for b in range(self.reader.num_record_batches)
                for v in self.reader.get_batch(b).column(name).to_pylist()]

    def read(self, row: int) -> bytes:
        return self.reader.get_batch(row // ROWS).column(0)[row % ROWS].as_py()


class StreamedSplit:
    """A split whose images stay encoded: labels, stored sizes and digests in memory, bytes in the EncodedStore."""

    def __init__(self, store: EncodedStore, rows: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
                 digests: list[bytes], store_size: int):
        self.store, self.rows, self.labels, self.sizes = store, rows, labels, sizes
        self.digests, self.store_size = digests, store_size
        self.decoded = 0  # images this process decoded (counted where decoding runs in this process)

    @classmethod
    def open(cls, path: str, store_size: int) -> "StreamedSplit":
        store = EncodedStore(path)
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

    def decode(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images of samples `indices` (B,) in a box-padded uint8 (B, 3, h, w), and their sizes (B, 2)."""
        sizes = self.sizes[indices]
        out = torch.zeros(len(indices), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), dtype=torch.uint8)
        for k, i in enumerate(indices.tolist()):
            row = int(self.rows[i])
            img = decode_image(self.store.read(row), f"{self.store.path}[{row}]", self.store_size)
            out[k, :, :img.shape[1], :img.shape[2]] = img
        self.decoded += len(indices)
        return out, sizes

    def decode_pil(self, indices: torch.Tensor) -> list:
        """The stored images of samples `indices` as Pillow images (a worker computing views with Pillow)."""
        rows = [int(self.rows[i]) for i in indices.tolist()]
        images = [decode_pil(self.store.read(row), f"{self.store.path}[{row}]", self.store_size) for row in rows]
        self.decoded += len(rows)
        return images
