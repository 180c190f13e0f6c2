"""A streamed epoch (user data too large for the device) against the loop a user writes by hand.

Both train the same MLP with the same optimizer over the same map-style Dataset (generated
28x28 images, as a user's image Dataset returns them) through a DataLoader with the same number
of worker processes and batch size, and score the whole validation set after each epoch:
(a) hpo's Trainer over a `Stream` (what `data: {dataset: module:function}` becomes when the data
exceeds `data.max_resident_mb`); (b) the hand-written `for x, y in loader:` loop. Epochs alternate
A B A B after one warm-up epoch each; the median epoch times and their ratio are reported.

    python benchmarks/streamed.py
"""

from __future__ import annotations

import argparse
import time

from _common import alternate, median, record, table, warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from hpo.data.splits import Data
    from hpo.data.user import Stream
    from hpo.spec.params import Params
    from hpo.training.models import build_model
    from hpo.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    warm_up()
    cpu = torch.device("cpu")

    class Images(Dataset):  # type: ignore[type-arg]
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 10, (n,), generator=g)
            self.x = torch.randn(n, 1, 28, 28, generator=g) + self.y.view(-1, 1, 1, 1) * 0.1

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.x[i], self.y[i]

    train, val = Images(args.samples, 1), Images(args.samples // 5, 2)
    p = Params(width=256, depth=2, batch_size=args.batch_size, optimizer="adam", lr=1e-3)
    streams = [Stream(d, args.workers, False) for d in (train, val, val)]
    data = Data(*streams, input_shape=(1, 28, 28), n_outputs=10, task="classification")
    torch.manual_seed(0)
    trainer = Trainer(build_model("mlp", p, (1, 28, 28), 10), p, data, 10**6, cpu, 0)

    torch.manual_seed(0)
    model = build_model("mlp", p, (1, 28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # hpo's kernel too: only the data path differs
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val, batch_size=4096, num_workers=args.workers)

    def by_hand() -> float:
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val_loader:
                correct += int((model(x).argmax(1) == y).sum())
        return time.perf_counter() - t0

    def hpo_epoch() -> float:
        t0 = time.perf_counter()
        trainer.run_epoch()
        return time.perf_counter() - t0

    by_hand()
    hpo_epoch()
    runs = alternate({"hpo Trainer, streamed": hpo_epoch, "hand-written DataLoader loop": by_hand}, args.repeats)
    ratios = [a / b for a, b in zip(*runs.values())]
    body = table(["variant", "median epoch s", "min", "max"],
                 [[k, median(v), min(v), max(v)] for k, v in runs.items()])
    body += (f"\n\nhpo / hand-written: **{median(ratios):.3f}x** (pairs {min(ratios):.3f}-{max(ratios):.3f}; "
             f"{args.samples} training images of 1x28x28, batch {args.batch_size}, {args.workers} loader workers, "
             f"MLP 256 x 2, Adam)")
    record("Streamed user data: hpo's epoch vs a hand-written DataLoader loop", body, save=not args.no_save)


if __name__ == "__main__":
    main()
