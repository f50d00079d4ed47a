"""`make gpu-check`: the CUDA tests (fast == reference, the bench, a bf16 locate of one query), then the
SmolLM2 bench on the GPU. Under 10 minutes on one GPU. Without a GPU: one line saying so, exit 0.

Needs a torch built with CUDA (the locked `make setup` venv carries the CPU build: pass GPU_PY=... to make).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        build = "CPU-only torch build" if torch.version.cuda is None else f"torch CUDA {torch.version.cuda}, no device"
        print(f"gpu-check: no CUDA GPU here ({build}); nothing to check")
        return 0
    t0 = time.perf_counter()
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m", "cuda",
                            str(ROOT / "tests" / "integration" / "test_cuda.py")], cwd=ROOT)
    if tests.returncode != 0:
        print(f"gpu-check: FAILED (CUDA tests, exit {tests.returncode}) after {time.perf_counter() - t0:.0f} s")
        return tests.returncode

    import qrnca_lens as ql
    from qrnca_lens.bench.ig import run_bench

    model = ql.load_model("smollm2", device="cuda")
    res = run_bench(model, steps=16, reference_layers=3, repeats=3, name="smollm2 (cuda)")
    ok = res["max_rel_diff"] < 1e-3 and res["eval_same_predictions"]
    print(f"gpu-check: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s; bench speed-up "
          f"{res['speedup']:.0f}x, max rel diff {res['max_rel_diff']:.1e}, fast path all layers {res['fast_s']:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
