"""Progress bars (bmssl/progress.py) when stderr is not a terminal: a log gets a line at most
every PLAIN_EVERY_S seconds and one at the end, not tqdm's carriage-return redraws."""
from bmssl import progress as progress_module
from bmssl.progress import progress


def test_plain_lines_are_throttled_and_the_last_one_is_written(capsys, monkeypatch):
    clock = iter(range(0, 10_000, 3))  # each perf_counter() call: 3 s later
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: float(next(clock)))
    assert list(progress(range(12), desc="reading", plain=True)) == list(range(12))
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("reading: ") for line in lines) and "\r" not in "".join(lines)
    assert lines[-1].startswith("reading: 12/12")
    assert 2 <= len(lines) <= 5  # 36 s of work at one line per 10 s, not 12 lines


def test_not_a_terminal_means_plain_lines(capsys):
    # under pytest's capture stderr is not a terminal: one plain line at the end, no redraws
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() and err.splitlines()[-1].startswith("x: 3/3 (")
    assert list(progress(range(3), desc="x", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
