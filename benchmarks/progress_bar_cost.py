"""What the training progress bar costs in a terminal, on small epochs.

    .venv/bin/python benchmarks/progress_bar_cost.py [--users 300 --batch-size 64 --epochs 6]

Trains a tiny bag model for ``--epochs`` epochs of small batches in a child process on a
pseudo-terminal (120 columns), so that the bars are drawn as in a terminal, once as the
trainer draws them (the loss shown at the bar's next timed refresh, at most 10 a second)
and once redrawing the bar for every batch (tqdm's ``set_postfix`` default), and once with
``--threads 2`` of each. Prints the bytes and redraws the terminal received and the
process's CPU and wall seconds per epoch.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import sys
import tempfile
import termios
import time
from pathlib import Path

WINDOW = struct.pack("HHHH", 40, 120, 0, 0)


def child(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from recdistill.data.feature_store import FeatureStore
    from recdistill.data.prepare import SplitSpec, prepare
    from recdistill.data.synthetic import SyntheticSpec, generate
    from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
    from recdistill.stage import LossTerm, StageSpec
    from recdistill.trainer import Trainer

    if args.refresh_every_batch:
        drawn = tqdm.set_postfix
        tqdm.set_postfix = lambda bar, *a, refresh=True, **k: drawn(bar, *a, refresh=True, **k)
    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    (scratch / "data").mkdir()
    generate(SyntheticSpec(users=args.users, items=400, seed=0), scratch / "data")
    prepare(scratch / "data", SplitSpec(seed=0))
    store = FeatureStore(scratch / "data", history_length=10)
    torch.manual_seed(0)
    model = TwoTower(
        TwoTowerSpec(embedding_dim=4, tower=(8,), feature_dim=2), FeatureSpace.of(store)
    )
    spec = StageSpec("tiny", "tiny", (LossTerm("softmax_ce"),), batch_size=args.batch_size)
    trainer = Trainer(spec, model, {}, store, scratch / "run")
    epochs = []
    for epoch in range(args.epochs):
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch(epoch)
        epochs.append((time.process_time() - cpu, time.perf_counter() - wall))
    (scratch / "epochs.json").write_text(
        json.dumps({"epochs": epochs, "batches": len(trainer.lists)})
    )


def on_terminal(argv: list[str]) -> bytes:
    """Run ``argv`` on a pseudo-terminal; what it wrote there."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, WINDOW)
        os.execv(sys.executable, [sys.executable, *argv])
    written = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.waitpid(pid, 0)
    return bytes(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refresh-every-batch", action="store_true")
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scratch:
        child(args)
        return
    print(
        f"{'bar':<26}{'threads':>8}{'batches':>8}{'bytes':>9}{'redraws':>9}{'cpu s/ep':>10}{'wall s/ep':>10}"
    )
    for threads in (1, 2):
        for every_batch in (True, False):
            with tempfile.TemporaryDirectory() as scratch:
                argv = [__file__, "--scratch", scratch, "--threads", str(threads)]
                argv += ["--users", str(args.users), "--batch-size", str(args.batch_size)]
                argv += ["--epochs", str(args.epochs)]
                written = on_terminal(argv + (["--refresh-every-batch"] if every_batch else []))
                result = Path(scratch) / "epochs.json"
                if not result.exists():
                    sys.exit(written.decode(errors="replace"))
                measured = json.loads(result.read_text())
            cpu, wall = (sum(e[i] for e in measured["epochs"]) / args.epochs for i in (0, 1))
            label = "redrawn every batch" if every_batch else "timed refresh (trainer)"
            redraws = written.count(b"\r")
            print(
                f"{label:<26}{threads:>8}{measured['batches']:>8}{len(written):>9,}"
                f"{redraws:>9,}{cpu:>10.3f}{wall:>10.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
