"""A dataset's items by image id, loaded ahead of use by DataLoader workers."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

__all__ = ["ItemFeed", "loader"]


def loader(dataset: Any, num_workers: int = 0) -> Any:
    """A DataLoader over single items (no batching, no shuffle), as the IRN hosts iterate their datasets."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=max(0, int(num_workers)), pin_memory=False)


class ItemFeed:
    """The items of ``dataset`` by image id, converted as the DataLoader converts them.

    Args:
        dataset: a map-style dataset whose item ``i`` is the image ``ids[i]``.
        ids: the dataset's image ids, in order.
        expected: the ids a loop will most likely ask for, in that order; with ``num_workers`` > 0 a
            DataLoader prefetches them. An id asked out of that order is read directly.
        num_workers: DataLoader workers.
    """

    def __init__(self, dataset: Any, ids: Sequence[str], expected: Sequence[str] = (), num_workers: int = 0) -> None:
        from torch.utils.data import Subset

        self.dataset = dataset
        self.index = {name: i for i, name in enumerate(ids)}
        wanted = [i for i in expected if i in self.index] if num_workers > 0 else []
        self.pending = deque(wanted)
        self.count = Counter(wanted)
        self.iter = iter(loader(Subset(dataset, [self.index[i] for i in wanted]), num_workers)) if wanted else None

    def __call__(self, image_id: str) -> Any:
        from torch.utils.data import default_convert

        if self.count.get(image_id, 0) > 0:
            while self.pending:  # drop prefetched items the loop skipped
                name = self.pending.popleft()
                self.count[name] -= 1
                item = next(self.iter)
                if name == image_id:
                    return item
        if image_id not in self.index:
            raise ValueError(f"image {image_id!r} is not in the dataset's image list")
        return default_convert(self.dataset[self.index[image_id]])

    def close(self) -> None:
        self.iter = None
        self.pending.clear()
        self.count.clear()

    def __enter__(self) -> ItemFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
