"""A function over many items with a fixed number in flight, in order, with a progress bar."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional


def parallel_map(fn: Callable, items: list, concurrency: int, desc: str,
                 errors: Optional[list] = None) -> list:
    """fn over items with `concurrency` requests in flight, in order, with a progress bar.

    With `errors` given, a failing item yields None and (item index, message) is appended to
    it (a long benchmark should not die on one bad request; the JSON reports the failures);
    without it the first failure is raised.
    """
    from tqdm import tqdm

    def guarded(i_item):
        i, item = i_item
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 - reported in the JSON, not hidden
            if errors is None:
                raise
            errors.append({"index": i, "error": f"{type(e).__name__}: {e}"[:1000]})
            return None

    with ThreadPoolExecutor(max(1, concurrency)) as ex:
        return list(tqdm(ex.map(guarded, enumerate(items)), total=len(items), desc=desc,
                         dynamic_ncols=True))
