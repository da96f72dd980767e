"""The progress bar every long command shows on stderr (bench, eval, finetune, the paper experiments).

    bar = Progress("finetune", total=200, start=resumed_step, quiet=args.quiet)
    bar.update(step, "loss 2.31")      # absolute position; or bar.step(note=...) to advance by one
    bar.close()

    bench.run(progress=Progress("bench"))   # as a callback progress(done, total, label), total learnt on the call

On a terminal it is one line rewritten in place (at most ~10 times a second, always at the end); otherwise (a
log file, CI) a plain line every ~5% of the total, so logs stay short. Nothing here imports the rest of
posenc, so every layer can use it.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]

_WIDTH = 24
_TTY_INTERVAL = 0.1  # seconds between redraws of the terminal line


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A progress bar on stderr (or `stream`) for `total` steps, of which `start` were done before (a resumed
    run: the speed and the time left count from there). quiet=True: writes nothing."""

    def __init__(self, label: str, total: int | None = None, *, start: int = 0, quiet: bool = False, stream=None):
        self.label, self.total, self.start, self.quiet = label, total, start, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = start
        self.t0 = time.perf_counter()
        self._drawn_at = -float("inf")  # when the terminal line was last drawn
        self._logged = None             # the step of the last plain line
        self._open = False              # a terminal line without its newline

    def __call__(self, done: int, total: int, note: str = "") -> None:
        """The callback form: progress(done, total, label), as bench.run, evaluate and quant take it."""
        self.total = total
        self.update(done, note)

    def step(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str = "") -> None:
        """Now `done` of the total are done."""
        self.done = done
        if self.quiet:
            return
        total = max(1, self.total or 1)
        finished = done >= total
        now = time.perf_counter()
        if self.tty:
            if not finished and now - self._drawn_at < _TTY_INTERVAL:
                return
            self._drawn_at = now
        else:
            every = max(1, total // 20)
            if not (finished or self._logged is None or done - self._logged >= every):
                return
            if finished and self._logged == done:
                return
            self._logged = done
        line = self._line(done, total, now - self.t0, note)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open = True
            if finished:
                self.close()
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _line(self, done: int, total: int, elapsed: float, note: str) -> str:
        fill = int(_WIDTH * min(1.0, done / total))
        ran = done - self.start
        left = elapsed / ran * (total - done) if ran > 0 and done < total else 0.0
        timing = _clock(elapsed) + (f" eta {_clock(left)}" if ran > 0 and done < total else "")
        text = f"{self.label} [{'#' * fill}{'.' * (_WIDTH - fill)}] {done}/{total} {timing}"
        return f"{text} {note}" if note else text

    def close(self) -> None:
        """End the terminal line (idempotent)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
