"""Where per-query work runs: in this process (``SerialExecutor``) or on a cluster (``RayExecutor``).

Attribution is independent per query and selection is a cheap reduce over stored scores, so scaling out is a
scheduling problem. An executor offers two operations:

- ``attribute(jobs, ig, layers)``: for each ``(query_id, prompts)`` job, the query's IG scores and its info,
  yielded as each query finishes (in any order). ``locate`` writes each result to the run store as it
  arrives, so a lost worker loses no finished query.
- ``score_items(items, every_position=..., batch_size=..., progress=...)``: the evaluation's batched scoring
  of (prompt, intervention) pairs, results in input order, with a progress bar (per prefix group in this
  process, per worker chunk on Ray) unless ``progress=False``.

Example:
    >>> ex = SerialExecutor(model)                                        # doctest: +SKIP
    >>> for qid, scores, info in ex.attribute([(q.id, prompts)], IGConfig(), layers): ...  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ..data.prompts import Prompt
from ..errors import QrncaError
from ..protocols import HookedModel
from .ig import IGConfig, attribute_prompts

__all__ = ["Executor", "SerialExecutor", "RayExecutor", "attribute_query"]

Job = tuple[str, Sequence[Prompt]]


def attribute_query(model: HookedModel, prompts: Sequence[Prompt], ig: IGConfig, layers: Sequence[int]) -> tuple[Tensor, dict[str, Any]]:
    """One query's work: IG scores of its prompts, and how the model did on them (stored with the scores)."""
    from ..engine.scoring import score_prompts

    t0 = time.perf_counter()
    scores = attribute_prompts(model, prompts, ig, layers=list(layers))
    seconds = time.perf_counter() - t0  # IG alone: what the comparison table reports as QRNCA's cost
    sc = score_prompts(model, prompts, progress=False)  # locate's own bar counts queries
    info = {
        "group": prompts[0].group,
        "n_tokens": [len(p.tokens) for p in prompts],
        "templates": [p.template for p in prompts],
        "target_probs": [x.target_prob for x in sc],
        "correct": [bool(x.correct) for x in sc],
        "attribution_seconds": seconds,
    }
    return scores, info


@runtime_checkable
class Executor(Protocol):
    """Where per-query work runs: IG attribution of jobs, and batched scoring of (prompt, intervention) items."""

    def attribute(self, jobs: Sequence[Job], ig: IGConfig, layers: Sequence[int]) -> Iterator[tuple[str, Tensor, dict[str, Any]]]: ...

    def score_items(self, items: Sequence[Any], *, every_position: bool = False, batch_size: int = 8,
                    engine: bool = True, progress: bool = True) -> list[Any]: ...


class SerialExecutor:
    """Everything in this process, on the caller's model (what ``locate``/``evaluate`` use by default).

    Example:
        >>> ex = SerialExecutor(model)                                                     # doctest: +SKIP
        >>> run = locate(model, queries, cfg, pool=pool, out="runs/facts", executor=ex)   # doctest: +SKIP
    """

    def __init__(self, model: HookedModel) -> None:
        self.model = model

    def attribute(self, jobs: Sequence[Job], ig: IGConfig, layers: Sequence[int]) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
        for qid, prompts in jobs:
            scores, info = attribute_query(self.model, prompts, ig, layers)
            yield qid, scores, info

    def score_items(self, items: Sequence[Any], *, every_position: bool = False, batch_size: int = 8,
                    engine: bool = True, progress: bool = True) -> list[Any]:
        from ..engine.scoring import score_items

        return score_items(self.model, items, every_position=every_position, batch_size=batch_size, engine=engine,
                           progress=progress)


# ---------------------------------------------------------------- Ray


class _Worker:
    """One model replica in one Ray actor (wrapped by ``ray.remote`` at run time, so ray is never imported early).

    The model is loaded once, in the constructor; a restarted actor (``max_restarts``) loads it again.
    """

    def __init__(self, model_name: str, threads: int, loader: Callable[[str], Any] | None, device: str | None,
                 dtype: str = "float32") -> None:
        import torch

        # Ray sets OMP_NUM_THREADS=1 (or the actor's num_cpus) in its workers; float reductions can depend on the
        # thread count, so use the driver's count (or the one asked for) to match a serial run bit for bit.
        torch.set_num_threads(int(threads))
        if loader is not None:
            self.model = loader(model_name)
        else:
            from ..model.loading import load_model

            self.model = load_model(model_name, device=device, dtype=dtype)

    def ready(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "node": os.uname().nodename}

    def attribute(self, qid: str, prompts: Sequence[Prompt], ig: IGConfig, layers: Sequence[int]) -> tuple[str, Tensor, dict[str, Any]]:
        scores, info = attribute_query(self.model, prompts, ig, layers)
        return qid, scores.detach().cpu(), info

    def score_items(self, items: Sequence[Any], every_position: bool, batch_size: int, engine: bool = True) -> list[Any]:
        from ..engine.scoring import score_items

        # The driver shows the bar (over the workers' chunks); a worker's own would only clutter its log.
        return score_items(self.model, items, every_position=every_position, batch_size=batch_size, engine=engine,
                           progress=False)


class RayExecutor:
    """Per-query work on a Ray cluster: one model replica per actor, results streamed back to the driver.

    ``attribute`` schedules one task per query across the actors (at most two in flight per actor) and yields
    each result as it finishes; ``locate`` writes it to the run store on the driver right away, so a lost worker
    loses no finished query and a rerun skips the done ones. ``score_items`` splits the items into contiguous
    chunks, one per live actor, and concatenates the results in input order.

    Failures: actors restart (``max_restarts=max_retries``) and Ray retries their in-flight tasks
    (``max_task_retries=max_retries``). Should a task still fail because its actor died (or its result was
    lost with a node), the task is resubmitted to a live actor, up to ``max_retries`` times per task; a dead
    actor is probed and leaves the pool if it does not come back. Python exceptions raised by the work itself
    (a ModelError, CUDA out of memory) are not retried: they are raised in the driver.

    ``address``: a running cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``). None uses the Ray
    session this process already has; else ``ray.init()``'s own rule: ``$RAY_ADDRESS``, or the cluster last
    started on this machine by ``ray start``, or a new local one. ``shutdown()`` undoes what this executor did
    (it disconnects, or stops the local cluster it started), never a session it found.
    ``threads``: torch threads per actor (default: the driver's ``torch.get_num_threads()``, which makes the
    scores bit-identical to a serial run on the driver; the count changes float reductions).
    ``cpus_per_worker``: CPUs Ray reserves per actor (default: ``threads`` when given, else 1).
    ``gpus_per_worker``: GPUs reserved per actor; the default loader then loads the model on ``"cuda"``.
    ``dtype``: the weights' dtype the default loader uses (``"float32"``, ``"bfloat16"``, ``"float16"``): the
    driver's model's, so that every replica computes in the dtype the run records.
    ``loader``: ``loader(model_name) -> model`` run in each actor instead of ``load_model`` (e.g. a model
    spread over the actor's GPUs); it must be importable or picklable on the workers.

    Example:
        >>> with RayExecutor("smollm2", address="auto", workers=4) as ex:                 # doctest: +SKIP
        ...     locate(model, queries, cfg, pool=pool, out="runs/facts", executor=ex)
    """

    IN_FLIGHT = 2  # tasks queued per actor: the next query is already there when one finishes

    def __init__(
        self,
        model_name: str,
        *,
        address: str | None = None,
        workers: int = 2,
        gpus_per_worker: float | int = 0,
        threads: int | None = None,
        max_retries: int = 3,
        cpus_per_worker: float | int | None = None,
        loader: Callable[[str], Any] | None = None,
        startup_timeout: float | int | None = 900,
        dtype: str = "float32",
    ) -> None:
        try:
            import ray
        except ImportError:
            raise QrncaError("RayExecutor needs Ray: pip install 'qrnca-lens[ray]' (or pip install 'ray>=2.9')") from None
        import torch

        if workers < 1:
            raise QrncaError(f"workers must be at least 1, got {workers}")
        if max_retries < 0:
            raise QrncaError(f"max_retries must be >= 0, got {max_retries}")
        from ..model.access import dtype_name, parse_dtype

        dtype = dtype_name(parse_dtype(dtype))  # a bad name fails here, not in every actor
        self.model_name = model_name
        self.workers = int(workers)
        self.max_retries = int(max_retries)
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        if cpus_per_worker is None:
            cpus_per_worker = self.threads if threads is not None else 1
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(include_dashboard=False)
            else:
                ray.init(address=address)
            self._owns_ray = True
        elif address is not None:
            raise QrncaError(f"this process is already connected to a Ray cluster; cannot also connect to {address!r} "
                             "(pass address=None to use the running session, or ray.shutdown() first)")
        device = "cuda" if gpus_per_worker and loader is None else None
        cls = ray.remote(_Worker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
            max_restarts=self.max_retries, max_task_retries=self.max_retries,
        )
        t0 = time.perf_counter()
        self._actors = [cls.remote(model_name, self.threads, loader, device, dtype) for _ in range(self.workers)]
        self._alive = [True] * self.workers
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=startup_timeout)  # type: ignore[attr-defined]
        except ray.exceptions.GetTimeoutError:
            res = ray.cluster_resources()
            self.shutdown()
            raise QrncaError(
                f"{workers} Ray workers ({cpus_per_worker} CPU, {gpus_per_worker} GPU each) did not start within "
                f"{startup_timeout} s; the cluster offers {res}. Use fewer --workers or add nodes"
            ) from None
        except ray.exceptions.RayActorError as err:
            self.shutdown()
            last = [line for line in str(err).splitlines() if line.strip()][-1]
            raise QrncaError(f"a Ray worker could not load the model {model_name!r} (every node needs qrnca-lens and "
                             f"the model at that name): {last}") from err
        except BaseException:
            self.shutdown()
            raise
        self.startup_seconds = time.perf_counter() - t0
        self.resubmitted = 0  # tasks this executor resubmitted itself (Ray's own retries are not counted)

    # ------------------------------------------------------------ the public surface

    def attribute(self, jobs: Sequence[Job], ig: IGConfig, layers: Sequence[int]) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
        layers = list(layers)
        calls = [(qid, "attribute", (qid, list(prompts), ig, layers)) for qid, prompts in jobs]
        for _, result in self._run(calls, self.IN_FLIGHT):
            yield result

    def score_items(self, items: Sequence[Any], *, every_position: bool = False, batch_size: int = 8,
                    engine: bool = True, progress: bool = True) -> list[Any]:
        from ..engine.scoring import progress_bar

        items = list(items)
        if not items:
            return []
        n = min(sum(self._alive) or 1, len(items))
        bounds = [len(items) * k // n for k in range(n + 1)]
        calls = [(k, "score_items", (items[bounds[k]:bounds[k + 1]], every_position, batch_size, engine))
                 for k in range(n)]
        chunks = dict(progress_bar(self._run(calls, 1), n, "scoring", enabled=progress, unit="chunk"))
        return [x for k in range(n) for x in chunks[k]]

    def worker_info(self) -> list[dict[str, Any]]:
        """pid, torch threads and node of every live actor (a restarted actor shows its new pid)."""
        return self._ray.get([a.info.remote() for a, ok in zip(self._actors, self._alive) if ok])  # type: ignore[attr-defined]

    @property
    def actors(self) -> list[Any]:
        return [a for a, ok in zip(self._actors, self._alive) if ok]

    def shutdown(self) -> None:
        """Kill the actors (and the local Ray session, if this executor started it)."""
        ray = self._ray
        for a in getattr(self, "_actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._actors, self._alive = [], []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------ scheduling

    def _run(self, calls: Sequence[tuple[Any, str, tuple]], depth: int) -> Iterator[tuple[Any, Any]]:
        """Run ``(key, method, args)`` calls on the live actors; yield ``(key, result)`` as each finishes."""
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
        queue = deque((key, method, args, 0) for key, method, args in calls)
        load = [0] * len(self._actors)
        inflight: dict[Any, tuple] = {}  # ref -> ("call", actor, key, method, args, attempts) | ("probe", actor)
        probing: set[int] = set()
        try:
            while queue or any(v[0] == "call" for v in inflight.values()):
                for i, actor in enumerate(self._actors):
                    while queue and self._alive[i] and i not in probing and load[i] < depth:
                        key, method, args, attempts = queue.popleft()
                        ref = getattr(actor, method).remote(*args)
                        inflight[ref] = ("call", i, key, method, args, attempts)
                        load[i] += 1
                if not inflight:
                    raise QrncaError(f"every Ray worker died; {len(queue)} tasks were left undone (with locate, "
                                     "finished queries are stored: rerun with the same --out to resume)")
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                entry = inflight.pop(ref)
                i = entry[1]
                if entry[0] == "probe":
                    probing.discard(i)
                    try:
                        ray.get(ref)
                    except lost:
                        self._alive[i] = False  # did not come back: leaves the pool
                    continue
                _, i, key, method, args, attempts = entry
                load[i] -= 1
                try:
                    result = ray.get(ref)
                except lost as err:
                    if attempts >= self.max_retries:
                        raise QrncaError(f"task {key!r} failed {attempts + 1} times on lost Ray workers; last: {err}") from err
                    self.resubmitted += 1
                    queue.appendleft((key, method, args, attempts + 1))
                    if i not in probing and self._alive[i]:
                        probing.add(i)  # is the actor back (restarted) or gone for good?
                        inflight[self._actors[i].ready.remote()] = ("probe", i)
                    continue
                yield key, result
        finally:
            for ref, entry in inflight.items():  # a consumer that stops early leaves nothing running
                if entry[0] == "call":
                    try:
                        ray.cancel(ref)
                    except Exception:
                        pass
