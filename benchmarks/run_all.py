"""`make bench`: every benchmark in turn (one at a time: the machine has 2 cores)."""

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent

for name in ("bench_preprocess.py", "bench_train.py", "bench_predict.py", "bench_field.py"):
    print(f"\n== {name}")
    runpy.run_path(str(HERE / name), run_name="__main__")
