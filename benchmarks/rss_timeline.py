"""Run a command and record its memory over time: where in a run the peak RSS happens.

``/usr/bin/time -v`` gives a run's peak RSS but not when it happened; the full SciTLDR LoRA run peaked at 8331 MB
while short runs of the same settings peak at 3.9-5.3 GB, and nobody could say which phase made the difference.
This samples the RSS of the command's whole process tree every ``--interval`` seconds and timestamps every line
the command prints (progress bars included, split at carriage returns), so the peak can be placed between two
log lines (a training step, a checkpoint save, an evaluation batch):

    python benchmarks/rss_timeline.py --json benchmarks/results/rss_timeline.json -- \\
        finetune train summarization-scitldr --use_peft true ...

Prints the peak, the time it happened and the last lines before it, and the peak of each stretch between
``--mark`` lines (regular expressions, e.g. ``--mark 'Generating|evaluat'``). Not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time

import psutil


def tree_rss_mb(process: psutil.Process) -> float:
    """RSS of a process and all its descendants, in MiB (0 for those that ended between listing and reading)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def read_lines(stream, start: float, lines: list[tuple[float, str]]) -> None:
    """Collect the command's output as (seconds since start, line) pairs, echoing it through.

    A line is timestamped when its first character arrives: a progress bar writes ``\\r<bar>`` and only the
    next update ends that text, so timing lines by their end would put each bar state one update late.
    """
    pending, began = "", 0.0
    for chunk in iter(lambda: stream.read1(4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        now = round(time.monotonic() - start, 2)
        for piece in re.split(r"([\r\n])", chunk.decode(errors="replace")):
            if piece in ("\r", "\n"):
                if pending.strip():
                    lines.append((began, pending))
                pending = ""
            elif piece:
                began = began if pending else now
                pending += piece
    if pending.strip():
        lines.append((began, pending))


def stretch_peaks(samples: list[tuple[float, float]], lines: list[tuple[float, str]],
                  marks: list[str]) -> list[dict]:
    """The peak between consecutive lines that match one of ``marks`` (and before the first one)."""
    bounds = [(0.0, "(start)")] + [(t, text) for t, text in lines if any(re.search(m, text) for m in marks)]
    stretches = []
    for (begin, label), (end, _) in zip(bounds, [*bounds[1:], (float("inf"), "")], strict=True):
        inside = [rss for t, rss in samples if begin <= t < end]
        if inside:
            stretches.append({"from_s": begin, "line": label[:160], "peak_rss_mb": round(max(inside))})
    return stretches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the samples, lines and peaks")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--mark", action="append", default=[],
                        help="regular expression of the lines that start a stretch (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("give the command to run after --")
    start = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=read_lines, args=(child.stdout, start, lines), daemon=True)
    reader.start()
    process = psutil.Process(child.pid)
    samples: list[tuple[float, float]] = []
    while child.poll() is None:
        samples.append((round(time.monotonic() - start, 2), round(tree_rss_mb(process), 1)))
        time.sleep(opts.interval)
    reader.join()
    peak_t, peak = max(samples, key=lambda sample: sample[1]) if samples else (0.0, 0.0)
    before = [text for t, text in lines if t <= peak_t][-5:]
    result = {"command": command, "returncode": child.returncode, "wall_s": round(time.monotonic() - start, 1),
              "interval_s": opts.interval, "peak_rss_mb": round(peak), "peak_at_s": peak_t,
              "lines_before_peak": before, "stretches": stretch_peaks(samples, lines, opts.mark),
              "samples": samples, "lines": lines}
    with open(opts.json, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"\npeak RSS {peak:.0f} MB at {peak_t:.0f} s of {result['wall_s']:.0f} s; the lines before it:")
    for text in before:
        print(f"  {text[:160]}")
    for stretch in result["stretches"]:
        print(f"  from {stretch['from_s']:7.0f} s  peak {stretch['peak_rss_mb']:6d} MB  {stretch['line'][:100]}")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
