"""Progress bars: tqdm when it is installed, else a plain line per step on stderr."""
import sys
import time

try:
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None


def progress(iterable, desc="", total=None, disable=False):
    if _tqdm is not None:
        return _tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True)
    return _plain(iterable, desc, total, disable)


def _plain(iterable, desc, total, disable):
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    start = time.perf_counter()
    for index, item in enumerate(iterable, 1):
        yield item
        if not disable:
            elapsed = time.perf_counter() - start
            eta = f", eta {elapsed / index * (total - index):.0f}s" if total else ""
            print(f"{desc}: {index}/{total or '?'} ({index / elapsed:.2f}/s{eta})", file=sys.stderr)
