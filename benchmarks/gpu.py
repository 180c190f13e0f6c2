"""Question 6: the Fashion-MNIST MLP and CNN on a GPU.

For each model: epoch time, peak GPU memory and the fraction of the GPU's measured bf16 matmul
peak that training reaches (bf16 autocast on), with torch.compile off and on; then short real
studies (trials per hour). The fused comparison is benchmarks/fused.py.
Runs where optuna is not installed system-wide: carry the wheels (benchmarks/README.md).

    HPO_DATA_DIR=/path/to/fashion-mnist python benchmarks/gpu.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch
from _common import HERE, record, table

from hpo.data.splits import DataCache
from hpo.runtime.measure import count_parameters
from hpo.spec.loading import load_spec
from hpo.spec.params import Params
from hpo.training.models import build_model
from hpo.training.trainer import Trainer, configure_device


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 TFLOP/s of a large matrix product on random data (median of 10)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def train_flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device) -> float:
    """Forward FLOPs of one sample (counted by PyTorch), times 3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *input_shape, device=device)  # two samples: BatchNorm needs more than one
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train()
    return 3.0 * counter.get_total_flops() / 2


def epoch_stats(family: str, p: Params, data: DataCache, device: torch.device, epochs: int, compile_model: bool):
    split = data.get(p.scaling)
    torch.manual_seed(0)
    model = build_model(family, p, split.input_shape, split.n_outputs)
    trainer = Trainer(model, p, split, epochs + 1, device, 0, compile_model=compile_model)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.run_epoch()  # warm-up: cuDNN autotuning, compilation
    warm = time.perf_counter() - t0
    times = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_epoch()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    epoch = times[len(times) // 2]
    flops = train_flops_per_sample(trainer.model, split.input_shape, device) * len(split.train)
    return {
        "params": count_parameters(trainer.model),
        "epoch_s": epoch,
        "first_epoch_s": warm,
        "mem_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        "tflops": flops / epoch / 1e12,
        "val": trainer.evaluate(split.val)["accuracy"],
    }


def study_rate(spec_path, n_trials: int, epochs: int, device: torch.device, data: DataCache) -> tuple[float, float]:
    from hpo.execution.worker import run_worker
    from hpo.search.study import open_for_spec
    from hpo.storage.backends import open_storage

    spec = load_spec(spec_path).with_budget(n_trials=n_trials, epochs=epochs, timeout=None)
    spec = dataclasses.replace(spec, name=f"{spec.name}-gpu-{time.monotonic_ns()}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/hpo.db"
        handle = open_for_spec(spec, open_storage(url), url, f"{tmp}/a")
        t0 = time.perf_counter()
        run_worker(handle, device=device, data=data)
        wall = time.perf_counter() - t0
        return n_trials / wall * 3600, handle.study.best_value


def main() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--study-trials", type=int, default=12)
    ap.add_argument("--only", default="mlp,cnn", help="model families to measure")
    ap.add_argument("--compile", default="mlp,cnn", help="families to also measure with torch.compile")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    configure_device(device)
    peak = matmul_peak(device)
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    mlp_spec, cnn_spec = HERE.parent / "studies" / "fashion_mnist_mlp.yaml", HERE.parent / "studies" / "fashion_mnist_cnn.yaml"
    data = DataCache(load_spec(mlp_spec).data, 0, device, "cnn")
    rows = []
    configs = [
        ("mlp", Params(width=512, depth=2, batch_size=256, optimizer="adamw", lr=2e-3, norm="batch", dropout=0.2)),
        ("mlp", Params(width=1024, depth=3, batch_size=128, optimizer="adamw", lr=1e-3, norm="batch", dropout=0.2)),
        ("cnn", Params(width=64, depth=3, batch_size=128, optimizer="adamw", lr=2e-3, norm="batch")),
    ]
    for family, p in [(f, p) for f, p in configs if f in args.only]:
        for compiled in (False, True) if family in args.compile else (False,):
            try:
                s = epoch_stats(family, p, data, device, args.epochs, compiled)
            except Exception as e:  # compile may be unavailable; say so rather than stop
                rows.append([family, f"{p.width}x{p.depth} bs{p.batch_size}", "on" if compiled else "off",
                             "-", "-", "-", "-", "-", f"failed: {type(e).__name__}"])
                continue
            rows.append([family, f"{p.width}x{p.depth} bs{p.batch_size}", "on" if compiled else "off", s["params"],
                         s["epoch_s"], s["first_epoch_s"], s["mem_mib"], s["tflops"], f"{s['tflops'] / peak:.2%}"])
            print(rows[-1], flush=True)
    body = table(["model", "config", "compile", "params", "epoch s", "first epoch s", "peak MiB",
                  "TFLOP/s", "of bf16 peak"], rows)
    if args.study_trials:
        mlp_rate, mlp_best = study_rate(mlp_spec, args.study_trials, 5, device, data)
        print("mlp study", mlp_rate, mlp_best, flush=True)
        cnn_rate, cnn_best = study_rate(cnn_spec, max(2, args.study_trials // 3), 3, device, data)
        body += "\n\n" + table(["study (short budget)", "trials / hour", "best val"], [
            [f"fashion_mnist_mlp, {args.study_trials} trials x 5 epochs", mlp_rate, mlp_best],
            [f"fashion_mnist_cnn, {max(2, args.study_trials // 3)} trials x 3 epochs", cnn_rate, cnn_best],
        ])
    notes = (f"Measured bf16 matmul peak on this GPU: {peak:.0f} TFLOP/s (8192^3, median of 10). "
             "TFLOP/s counts PyTorch's own FLOP count of the forward pass x3 over the epoch's samples; "
             "bf16 autocast and TF32 on.")
    record("GPU: Fashion-MNIST MLP and CNN", body, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
