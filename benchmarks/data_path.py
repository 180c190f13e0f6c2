"""Question 2: does hpo's data path cost anything over pure compute?

hpo's epoch (Trainer.train_epoch: permutation index into device-resident tensors, loss kept on the
device) against a pure-compute loop over batches sliced before the clock starts, same model,
optimizer and batch sequence; a DataLoader over a TensorDataset is shown for reference.
Target: hpo / pure <= 1.10.

    python benchmarks/data_path.py [--repeats 7] [--device cpu|cuda] [--dataset digits|fashion_mnist]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import alternate, median, record, table

from hpo.data.splits import DataCache
from hpo.spec.params import Params
from hpo.spec.schema import DataSpec, SplitSpec
from hpo.training.models import build_model
from hpo.training.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist"])
    ap.add_argument("--batch-sizes", default="32,128,512")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    split = SplitSpec(0.9, 0.1, 0.0) if args.dataset == "fashion_mnist" else SplitSpec()
    cache = DataCache(DataSpec(args.dataset, split), 0, device)
    data = cache.get("standard")
    rows = []
    for bs in map(int, args.batch_sizes.split(",")):
        p = Params(width=256, depth=2, batch_size=bs, optimizer="adam", lr=1e-3)
        torch.manual_seed(0)
        trainer = Trainer(build_model("mlp", p, data.input_shape, data.n_outputs), p, data, 10, device, 0)
        model, opt = trainer.model, trainer.opt
        autocast = device.type == "cuda"

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def hpo_epoch() -> float:
            sync()
            t0 = time.perf_counter()
            trainer.train_epoch()
            sync()
            return time.perf_counter() - t0

        def pure_epoch() -> float:
            # The same number and size of batches, sliced before the clock starts.
            perm = torch.randperm(len(data.train), device=device)
            batches = [(data.train.x[perm[s : s + trainer.batch_size]], data.train.y[perm[s : s + trainer.batch_size]])
                       for s in trainer.starts]
            model.train()
            sync()
            t0 = time.perf_counter()
            for xb, yb in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = F.cross_entropy(model(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync()
            return time.perf_counter() - t0

        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.train.x, data.train.y), batch_size=trainer.batch_size, shuffle=True
        )

        def dataloader_epoch() -> float:
            model.train()
            sync()
            t0 = time.perf_counter()
            for xb, yb in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = F.cross_entropy(model(xb).float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss.item()  # the per-batch sync a hand-written loop usually has (logging)
            sync()
            return time.perf_counter() - t0

        variants = {"hpo": hpo_epoch, "pure": pure_epoch, "dataloader": dataloader_epoch}
        for fn in variants.values():  # warm-up: allocator, kernels, first-touch
            fn()
        times = alternate(variants, args.repeats)
        med = {k: median(v) for k, v in times.items()}
        rows.append([bs, len(trainer.starts), med["pure"] * 1e3, med["hpo"] * 1e3, med["dataloader"] * 1e3,
                     med["hpo"] / med["pure"], med["dataloader"] / med["pure"]])
    body = table(["batch", "steps/epoch", "pure ms", "hpo ms", "DataLoader ms", "hpo / pure", "DataLoader / pure"], rows)
    notes = (f"{args.dataset} MLP 256x2, Adam, {args.repeats} alternating repeats, median epoch time "
             f"on {device}. Target: hpo / pure <= 1.10.")
    record(f"Data path ({args.dataset}, {device})", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
