"""The distillation run: prompts -> router -> teacher pools -> Arrow stream -> trainer, with a Parquet spill.

- run.py: `run_distill` and `run_train`, the wiring of the parts and the run's summary.
- feed.py: the input read and routed chunk by chunk (`InputFeed`), and the run's dead letters.
- routes.py: the planner (routed prompts into teacher requests), the pools a run starts, and the one rule for
  teachers that are down (`Fallback`).
- dispatch.py: the `Dispatcher` loop that keeps the replicas busy and passes their answers on.
"""

from avocado_ray.pipeline.run import run_distill, run_train

__all__ = ["run_distill", "run_train"]
