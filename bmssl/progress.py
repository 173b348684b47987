"""Progress bars: tqdm on a terminal; elsewhere (a log file, a pipe, or without tqdm) a plain
line on stderr at most every PLAIN_EVERY_S seconds, and one at the end."""
import sys
import time

try:
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None

PLAIN_EVERY_S = 10.0


def progress(iterable, desc="", total=None, disable=False, plain=None):
    """Iterate over `iterable` with a bar. plain: force (True) or forbid (False) the plain lines;
    by default they are used when stderr is not a terminal or tqdm is missing."""
    if plain is None:
        plain = _tqdm is None or not sys.stderr.isatty()
    if not plain:
        return _tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True)
    return _plain(iterable, desc, total, disable)


def _plain(iterable, desc, total, disable):
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    start = last = time.perf_counter()
    for index, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if disable or (now - last < PLAIN_EVERY_S and index != total):
            continue
        last, elapsed = now, now - start
        eta = f", eta {elapsed / index * (total - index):.0f}s" if total else ""
        rate = f"{index / elapsed:.2f}/s" if elapsed > 0 else "-"
        print(f"{desc}: {index}/{total or '?'} ({rate}{eta})", file=sys.stderr, flush=True)


class StepBar:
    """A bar over training steps that shows a postfix (loss, accuracy, ...) beside tqdm's own
    steps/s and ETA. Without tqdm (or with plain=True, e.g. when stderr is not a terminal) it
    prints one line every `every` steps: "desc: step/total, x/s, eta Ns, key=value ...".

        bar = StepBar(total=1000, initial=done, desc="bmssl")
        bar.update(loss=0.42, acc=0.61)   # one step done
        bar.close()
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False,
                 every: int = 10, plain: bool | None = None):
        self.total, self.count, self.desc, self.disable = total, initial, desc, disable
        self.every = max(1, every)
        self.start, self.initial = time.perf_counter(), initial
        if plain is None:
            plain = _tqdm is None or not sys.stderr.isatty()
        self.bar = None if (disable or plain) else _tqdm(total=total, initial=initial, desc=desc,
                                                          unit="step", dynamic_ncols=True)

    def update(self, **postfix):
        self.count += 1
        if self.disable:
            return
        text = {key: (f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in postfix.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
            return
        if self.count % self.every and self.count != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(self.total - self.count) / rate:.0f}s" if rate > 0 else ""
        fields = " ".join(f"{key}={value}" for key, value in text.items())
        print(f"{self.desc}: {self.count}/{self.total}, {rate:.2f} steps/s{eta} {fields}", file=sys.stderr,
              flush=True)

    def write(self, message: str):
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
