"""Minibatches for training: chunks encoded and shuffled in a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ctrserve.features import FeatureEncoder
from ctrserve.training.data.source import DataSource, checked_chunks

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass(frozen=True)
class Encoded:
    """Encoded model inputs (in the encoder's input order) and 0/1 labels."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray | slice) -> Encoded:
        return Encoded(tuple(x[index] for x in self.inputs), self.labels[index])

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        if len(parts) == 1:
            return parts[0]
        inputs = tuple(np.concatenate(xs) for xs in zip(*(p.inputs for p in parts), strict=True))
        return Encoded(inputs, np.concatenate([p.labels for p in parts]))


def encoded_chunks(source: DataSource, split: str, encoder: FeatureEncoder) -> Iterator[Encoded]:
    """Each chunk of a split, validated and encoded."""
    names = encoder.input_names()
    for chunk in checked_chunks(source, split):
        columns = {name: chunk.table.column(name) for name in encoder.spec.names}
        encoded = encoder.transform(columns)
        labels = chunk.table.column(source.spec.label).to_numpy().astype(np.float32)
        yield Encoded(tuple(encoded[n] for n in names), labels)


def encode_split(source: DataSource, split: str, encoder: FeatureEncoder) -> Encoded:
    """A whole split in memory (evaluation splits are one day or one tenth of the data)."""
    return Encoded.concat(list(encoded_chunks(source, split, encoder)))


class BatchStream:
    """Shuffled training minibatches streamed from a split, prepared ahead in a thread.

    Rows are shuffled inside a buffer of `buffer_rows` (the whole split when it fits), so
    data larger than memory streams chunk by chunk. For data-parallel training every rank
    reads the same stream with the same seed and keeps its `rank::world` share of each
    global batch of `batch_size * world` rows, so all ranks take the same number of steps.
    """

    def __init__(self, source: DataSource, encoder: FeatureEncoder, batch_size: int, seed: int,
                 buffer_rows: int = 1_000_000, rank: int = 0, world: int = 1, prefetch: int = 8):
        self.source, self.encoder = source, encoder
        self.batch_size, self.seed, self.buffer_rows = batch_size, seed, buffer_rows
        self.rank, self.world, self.prefetch = rank, world, prefetch
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        worker = threading.Thread(target=self._produce, args=(q, stop, rng), daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def _produce(self, q: queue.Queue, stop: threading.Event, rng: np.random.Generator) -> None:
        try:
            for batch in self._global_batches(rng):
                if stop.is_set():
                    return
                if len(batch) < self.world:  # a tail too short to give every rank a row
                    continue
                q.put(self._local(batch))
            q.put(None)
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            q.put(exc)

    def _global_batches(self, rng: np.random.Generator) -> Iterator[Encoded]:
        size = self.batch_size * self.world
        pending: list[Encoded] = []
        rows = 0
        for part in encoded_chunks(self.source, "train", self.encoder):
            pending.append(part)
            rows += len(part)
            if rows >= self.buffer_rows:
                buffer = Encoded.concat(pending)
                buffer = buffer.take(rng.permutation(len(buffer)))
                full = len(buffer) // size * size
                yield from (buffer.take(slice(i, i + size)) for i in range(0, full, size))
                pending, rows = [buffer.take(slice(full, None))], len(buffer) - full
        if rows:
            buffer = Encoded.concat(pending)
            buffer = buffer.take(rng.permutation(len(buffer)))
            yield from (buffer.take(slice(i, i + size)) for i in range(0, len(buffer), size))

    def _local(self, batch: Encoded) -> Batch:
        if self.world > 1:
            batch = batch.take(slice(self.rank, None, self.world))
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in batch.inputs)
        return inputs, torch.from_numpy(np.ascontiguousarray(batch.labels))
