"""`make bench`: every benchmark in turn (one at a time: the machine has 2 cores). The accuracy curve trains for
the sum of its budgets per configuration (about 70 minutes by default): run it alone."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for name in ("phantom_stats.py", "bench_preprocess.py", "bench_train.py", "bench_predict.py", "bench_slice.py", "bench_field.py",
                 "bench_accuracy.py"):
        print(f"\n== {name}", flush=True)
        sys.argv = [name]
        runpy.run_path(str(HERE / name), run_name="__main__")
