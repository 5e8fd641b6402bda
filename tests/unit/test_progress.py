"""The driver's progress display (aigc_ray/progress.py): plain lines at most every interval
with the rate and the time left, a live tqdm bar on a terminal."""

import io
import re

from aigc_ray.progress import Progress, ProgressBoard, post


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_lines_are_throttled_and_say_rate_elapsed_and_time_left():
    out = io.StringIO()
    p = Progress("train", 300, "steps", stream=out, live=False, interval=10)
    p.started = 0.0
    p.update(0, {"val loss": 9.1}, now=5.0)  # after 5 s of startup: the first line at once
    p.update(10, {"loss": 8.7, "tokens/s": 2600.4}, now=6.0)  # within 10 s: no line
    p.update(100, {"loss": 6.25, "tokens/s": 2607.0}, now=15.0)  # 10 s on: a line
    lines = _lines(out)
    assert len(lines) == 2
    assert lines[0] == "train   0/300 steps (0%)  val loss 9.100  elapsed 0:05"
    # 100 steps in the 10 s since the first row (startup excluded): 200 left take 20 s
    assert lines[1] == (
        "train   100/300 steps (33%)  val loss 9.100  loss 6.250  tokens/s 2,607  "
        "elapsed 0:15  left 0:20"
    )


def test_rows_slower_than_the_interval_are_each_printed():
    """Rows 8 s apart with a 10 s interval: each is printed (waiting for the next would leave
    16 s without a line); rows 1 s apart: a line every 10 s."""
    out = io.StringIO()
    p = Progress("train", 300, stream=out, live=False, interval=10)
    for k in range(6):
        p.update(10 * k, {"loss": 5.0}, now=8.0 * k)
    assert len(_lines(out)) == 6
    out = io.StringIO()
    p = Progress("train", 300, stream=out, live=False, interval=10)
    for k in range(41):
        p.update(k, now=float(k))
    assert [int(x.split()[1].split("/")[0]) for x in _lines(out)] == [0, 10, 20, 30, 40]
    # rows 7 s apart: each printed (the next would come 14 s after a line)
    out = io.StringIO()
    p = Progress("train", 300, stream=out, live=False, interval=10)
    for k in range(5):
        p.update(k, now=7.0 * k)
    assert len(_lines(out)) == 5


def test_close_prints_the_last_state_once():
    out = io.StringIO()
    p = Progress("train", 8, "steps", stream=out, live=False, interval=10)
    p.update(6, {"loss": 5.0})
    p.update(8, {"loss": 4.5})  # within the interval: held back ...
    p.close()  # ... and printed at the end
    lines = _lines(out)
    assert [re.match(r"train\s+(\d+)/8", x).group(1) for x in lines] == ["6", "8"]
    assert "left 0:00" in lines[-1] and "loss 4.500" in lines[-1]
    p.close()
    assert len(_lines(out)) == 2


def test_a_restart_from_a_checkpoint_resets_the_rate():
    p = Progress("train", 100, stream=io.StringIO(), live=False, interval=0)
    p.update(0, now=0.0)
    p.update(50, now=10.0)
    p.update(30, now=20.0)  # a worker died; the run went back to its step-30 checkpoint
    p.update(40, now=22.0)  # 10 steps in 2 s: 60 left take 12 s
    assert p.left(22.0) == 12.0


def test_unknown_total_and_no_rows_print_nothing_wrong():
    out = io.StringIO()
    p = Progress("generate", None, "rows", stream=out, live=False, interval=0)
    p.close()
    assert out.getvalue() == ""  # nothing ran: no line
    p.update(5, {"errors": 1})
    assert re.fullmatch(r"generate 5 rows  errors 1  elapsed 0:00\n", out.getvalue())


def test_a_terminal_gets_a_live_bar():
    out = io.StringIO()
    p = Progress("train", 300, "steps", stream=out, live=True)
    p.update(150, {"loss": 5.0})
    p.close()
    text = out.getvalue()
    assert "\r" in text and "150/300" in text and "loss=5" in text


def test_the_board_hands_each_row_once():
    board = ProgressBoard()
    board.post({"step": 1})
    board.post({"step": 2})
    assert board.take() == [{"step": 1}, {"step": 2}]
    assert board.take() == []
    post(None, {"step": 3})  # no board (not rank 0): nothing happens
