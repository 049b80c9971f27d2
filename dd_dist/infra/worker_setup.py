"""Set-up run in every worker process of a local Ray (kept light: each worker imports this module)."""
import logging

# Ray Train's placement-group cleaner asks the state API, which lives in the dashboard, whether the train
# controller is alive: a local Ray has no dashboard, so it would warn every ~1.5 s of every fit (hundreds of
# lines in a long run). Nothing is lost: shutting the local Ray down at the end of the run removes its groups.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_ray() -> None:
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)
