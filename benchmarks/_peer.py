"""What the peer scripts (peer_ray.py, peer_hyperopt.py, peer_smac.py) share: their command line,
and the lines time_to_quality.py reads from them: one JSON line per finished trial ({"t", "state",
"value", "epochs"}; COMPLETE when it ran every epoch) and a last line {"best": ..., "trials": ...},
the best over complete trials. Standard library only: it runs in the peers' own interpreter."""

import argparse
import json
import math
import time


def peer_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", type=float, required=True, help="seconds: the script's wall time")
    return ap.parse_args()


class Lines:
    """Prints each finished trial's line and keeps the best complete value."""

    def __init__(self, direction: str, epochs: int) -> None:
        self.sign = -1.0 if direction == "maximize" else 1.0  # the peers minimize sign * value
        self.epochs = epochs
        self.best = math.nan

    def trial(self, value: object, epochs: int) -> None:
        full = epochs >= self.epochs
        print(json.dumps({"t": time.time(), "state": "COMPLETE" if full else "PRUNED", "value": value,
                          "epochs": epochs}), flush=True)
        if full and isinstance(value, (int, float)) and math.isfinite(value) \
                and (math.isnan(self.best) or self.sign * value < self.sign * self.best):
            self.best = float(value)

    def end(self, trials: int, best: float | None = None) -> None:
        print(json.dumps({"best": self.best if best is None else best, "trials": trials}))
